"""The connector's configuration file: what `connector add` prints is what `connector run` reads,
and anything else is refused with the setting named."""
import pytest
import yaml

from control.connector import parse_connector_config
from control.errors import InputError
from control.connector import connector_config
from control.wireguard import generate_keypair

PRIVATE, _ = generate_keypair()
_, GATEWAY = generate_keypair()


def printed() -> dict:
    return yaml.safe_load(connector_config("lan", PRIVATE, GATEWAY, "198.18.0.1:51821",
                                           ["100.96.0.0/12", "fd00:5a::/64"]))


def test_what_connector_add_prints_is_read_back():
    cfg = parse_connector_config(printed(), "lan.yaml")
    assert (cfg.name, cfg.interface, cfg.gateway_endpoint, cfg.keepalive) == ("lan", "ztr-lan", "198.18.0.1:51821", 25)
    assert [str(n) for n in cfg.device_networks] == ["100.96.0.0/12", "fd00:5a::/64"]


@pytest.mark.parametrize("change, what", [
    ({"extra": 1}, "unknown setting 'extra'"),
    ({"private_key": None}, "private_key: must be a non-empty string"),
    ({"private_key": "abc"}, "a WireGuard key is 44 characters"),
    ({"gateway_public_key": "x" * 44}, "WireGuard key"),
    ({"interface": "a-name-far-too-long"}, "not a Linux interface name"),
    ({"gateway_endpoint": "198.18.0.1"}, "is not HOST:PORT"),
    ({"device_networks": []}, "must be a list of prefixes"),
    ({"device_networks": ["100.96.0.1/12"]}, "device_networks"),
    ({"keepalive": 0}, "keepalive: must be seconds from 1"),
])
def test_bad_connector_config_is_refused(change, what):
    doc = dict(printed(), **change)
    with pytest.raises(InputError, match=what):
        parse_connector_config(doc, "lan.yaml")


def test_a_missing_setting_is_named():
    doc = printed()
    del doc["gateway_endpoint"]
    with pytest.raises(InputError, match="gateway_endpoint is missing"):
        parse_connector_config(doc, "lan.yaml")
