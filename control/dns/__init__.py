"""The DNS slow path (spec/POLICY.md, "Hostnames"): the resolvers' answers to devices are held
on an NFQUEUE until the addresses they teach are in the kernel, then released.

    settings.py    the `dns:` block of the gateway config
    wire.py        the IP and UDP/TCP headers of a queued packet, and its DNS bytes
    streams.py     DNS over TCP: each connection's messages, across segments
    messages.py    questions and answers read with dnspython; what an answer teaches
    questions.py   the devices' outstanding questions, which answers must match
    netfilter.py   the gateway's own iptables chain that queues them
    failopen.py    the queue bound fail-open: when it is full, packets pass unlearned
    slowpath.py    the thread that reads the queue, learns and releases
"""
