# Run by vagrant/build-box inside the new root filesystem (chroot, /bin/sh): makes the Debian
# system a Vagrant box. Nothing here is ztgate's: the project arrives by provisioning.
set -eu

echo ztgate-box > /etc/hostname
printf '127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n' > /etc/hosts
echo "LABEL=ztgate-root / ext4 rw,errors=remount-ro 0 1" > /etc/fstab

# Vagrant's user: its well-known key (Vagrant swaps it for a fresh one at the first `up`),
# sudo without a password.
useradd --create-home --shell /bin/bash --groups sudo vagrant
install -d -m 700 -o vagrant -g vagrant /home/vagrant/.ssh
install -m 600 -o vagrant -g vagrant /tmp/vagrant.pub /home/vagrant/.ssh/authorized_keys
rm -f /tmp/vagrant.pub
echo 'vagrant ALL=(ALL) NOPASSWD: ALL' > /etc/sudoers.d/vagrant
chmod 440 /etc/sudoers.d/vagrant
printf 'UseDNS no\nPasswordAuthentication no\n' > /etc/ssh/sshd_config.d/vagrant.conf
# Each VM gets its own host keys at its first boot, not the box's.
rm -f /etc/ssh/ssh_host_*
mkdir -p /etc/systemd/system/ssh.service.d
cat > /etc/systemd/system/ssh.service.d/hostkeys.conf <<'UNIT'
[Service]
ExecStartPre=
ExecStartPre=/usr/bin/ssh-keygen -A
ExecStartPre=/usr/sbin/sshd -t
UNIT

# The management NIC (eth0) by DHCP; the topology's NICs are configured by provisioning.
cat > /etc/systemd/network/10-eth0.network <<'NET'
[Match]
Name=eth0

[Network]
DHCP=ipv4
NET
systemctl enable systemd-networkd.service
# Wait for the management NIC only, and not for long (a VM with no DHCP answer still boots).
mkdir -p /etc/systemd/system/systemd-networkd-wait-online.service.d
cat > /etc/systemd/system/systemd-networkd-wait-online.service.d/any.conf <<'UNIT'
[Service]
ExecStart=
ExecStart=/lib/systemd/systemd-networkd-wait-online --any --timeout=60
UNIT

# No timers or services the VMs have no use for (they cost CPU under TCG).
systemctl mask apt-daily.timer apt-daily-upgrade.timer e2scrub_all.timer e2scrub_reap.service \
    fstrim.timer man-db.timer iperf3.service >/dev/null 2>&1 || true

# The initramfs with virtio and ext4 only (build-box set MODULES=list before the kernel came).
update-initramfs -u -k all
apt-get clean
rm -rf /var/lib/apt/lists/*
