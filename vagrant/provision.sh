#!/usr/bin/env bash
# Provisions one VM of the topology (run by Vagrant as root, from the Vagrantfile):
#   provision.sh ROLE [MAC=ADDR/LEN[,ADDR/LEN...]]...
# ROLE is gateway, alice, bob, connector or app. Each MAC=... names a NIC by its MAC and the
# addresses it gets. What needs two VMs (a device's or the connector's WireGuard
# configuration, issued on the gateway) is done by ./enroll afterwards, with the lab's verbs.
# Idempotent: a second run changes nothing that is already right.
set -euo pipefail
role=$1
shift
SRC=/opt/ztgate                       # the project, synced from the host by Vagrant
WHEELS=$SRC/vagrant/.wheelhouse       # made on the host by scripts/vagrant-test
say() { printf '[provision %s] %s\n' "$role" "$*"; }

hostnamectl set-hostname "$role" 2>/dev/null || { echo "$role" > /etc/hostname; hostname "$role"; }
grep -q " $role\$" /etc/hosts || echo "127.0.1.1 $role" >> /etc/hosts

# Packages: the box built by vagrant/build-box has them all; another box (VirtualBox on a
# laptop, with a network) gets them from its mirror.
pkgs=(wireguard-tools iproute2 iperf3 curl iputils-ping tcpdump python3)
case $role in gateway|connector)
    pkgs+=(python3-bpfcc libbpf1 linux-headers-amd64 wireguard-go iptables nftables
           libnetfilter-queue-dev python3-venv python3-dev gcc) ;;
esac
missing=$(for p in "${pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"; done)
if [ -n "$missing" ]; then
    say "installing $(echo $missing)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# The topology's NICs, named by MAC (systemd-networkd; no DHCP, no IPv6 autoconfiguration).
for nic in "$@"; do
    mac=${nic%%=*}
    file=/etc/systemd/network/20-ztgate-${mac//:/}.network
    {
        printf '[Match]\nMACAddress=%s\n\n[Network]\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n' "$mac"
        IFS=, read -ra addrs <<< "${nic#*=}"
        for a in "${addrs[@]}"; do printf 'Address=%s\n' "$a"; done
        # The app reaches the devices' pool only through the connector (as zt-app's default route
        # does in the lab); its default route stays Vagrant's management network.
        if [ "$role" = app ]; then printf '\n[Route]\nDestination=100.96.0.0/12\nGateway=10.20.0.1\n'; fi
    } > "$file.new"
    if ! cmp -s "$file.new" "$file"; then mv "$file.new" "$file"; changed=1; else rm "$file.new"; fi
done
systemctl enable --now systemd-networkd >/dev/null 2>&1
if [ -n "${changed:-}" ]; then
    networkctl reload
    for nic in "$@"; do
        ifname=$(ip -o link | awk -v m="${nic%%=*}" '$0 ~ "link/ether " m {sub(":", "", $2); print $2}')
        networkctl reconfigure "$ifname"
    done
fi
# Forwarding stays off (Debian's default) everywhere but where ztgate turns it on, per
# interface; provisioning must not write net.ipv4.ip_forward, which would reset those too.

# Kernel WireGuard in every VM.
modprobe wireguard
grep -qx wireguard /etc/modules-load.d/ztgate.conf 2>/dev/null || echo wireguard > /etc/modules-load.d/ztgate.conf

install_unit() {   # install_unit FILE: a unit of vagrant/units, enabled (not started)
    local name; name=$(basename "$1")
    if ! cmp -s "$1" "/etc/systemd/system/$name"; then
        cp "$1" "/etc/systemd/system/$name"
        systemctl daemon-reload
    fi
}

setup_project() {
    # scripts/setup, with Python packages from the host's wheelhouse only (when there is one).
    if [ -d "$WHEELS" ]; then
        export PIP_NO_INDEX=1 PIP_FIND_LINKS=$WHEELS
    fi
    "$SRC/scripts/setup"
    mkdir -p /etc/ztgate
}

case $role in
gateway)
    setup_project
    # deploy/gateway.yaml as it is, but for the address the devices dial.
    sed 's|^endpoint: .*|endpoint: 198.18.0.1:51820        # the gateway on the underlay|' \
        "$SRC/deploy/gateway.yaml" > /etc/ztgate/gateway.yaml.new
    mv /etc/ztgate/gateway.yaml.new /etc/ztgate/gateway.yaml
    install_unit "$SRC/deploy/ztgate.service"
    systemctl enable --now ztgate.service
    say "waiting for the gateway's socket (the first start compiles the program)"
    for _ in $(seq 600); do ztgate status >/dev/null 2>&1 && break; sleep 1; done
    ztgate status
    # The lab's users and policy (spec/LAB.md), with the lab's verbs.
    users=$(ztgate user list --json)
    for u in "alice@example.com --group developers --group staff" "bob@example.com --group staff"; do
        email=${u%% *}
        grep -q "\"$email\"" <<< "$users" || ztgate user add $u
    done
    ztgate policy apply "$SRC/examples/lab/policy.yaml"
    ;;
connector)
    setup_project
    install_unit "$SRC/vagrant/units/ztgate-connector.service"
    ;;
app)
    # The lab's services (lab/services.py) listen on 10.20.0.10:22 among others: this VM's
    # sshd keeps to the management address, so that port 22 on the LAN is the service's.
    mgmt=$(ip -4 -o addr show dev eth0 | awk '{sub("/.*", "", $4); print $4; exit}')
    sysctl -qw net.ipv4.ip_nonlocal_bind=1
    echo net.ipv4.ip_nonlocal_bind=1 > /etc/sysctl.d/90-ztgate-app.conf
    if [ "$(cat /etc/ssh/sshd_config.d/ztgate-app.conf 2>/dev/null)" != "ListenAddress $mgmt" ]; then
        echo "ListenAddress $mgmt" > /etc/ssh/sshd_config.d/ztgate-app.conf
        systemctl restart ssh
    fi
    install_unit "$SRC/vagrant/units/ztgate-lab-services.service"
    systemctl enable ztgate-lab-services.service >/dev/null 2>&1
    systemctl restart ztgate-lab-services.service
    ;;
alice|bob)
    ;;   # a device: wg-quick with the configuration ./enroll brings from the gateway
*)
    echo "provision.sh: unknown role $role" >&2
    exit 2
    ;;
esac
say "done"
