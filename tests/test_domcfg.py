"""xl.cfg-style domain configuration parsing."""

from __future__ import annotations

import pytest

from services.toolstack.domcfg import ConfigError, DomainConfig, parse

GOOD = """
# a guest
name = "g1"
vcpus = 4
memory = 64   # MiB
platform = 'xen-legacy'
workloads = [ "callouts:vcpus=0/1,count=10",
              "ipi_pingpong:from=0,to=1,gap_us=2.5" ]   # spans lines
disk = ["target=/tmp/x.img, vdev=xvda, access=rw"]
kernel_option = "a # not a comment"
"""


def test_parses_every_known_key_and_keeps_the_others() -> None:
    cfg = parse(GOOD)
    assert cfg == DomainConfig(
        "g1",
        4,
        64,
        "xen-legacy",
        0xFFFFFFFF,
        ("callouts:vcpus=0/1,count=10", "ipi_pingpong:from=0,to=1,gap_us=2.5"),
        ("target=/tmp/x.img, vdev=xvda, access=rw",),
        {"kernel_option": "a # not a comment"},
    )
    assert cfg.pages == 64 * 256
    assert cfg.to_json()["kernel_option"] == "a # not a comment"
    assert cfg.to_json()["workloads"] == [
        {"kind": "callouts", "vcpus": [0, 1], "count": 10},
        {"kind": "ipi_pingpong", "from": 0, "to": 1, "gap_us": 2.5},
    ]


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("vcpus = 2", "name: required"),
        ('name = "x"\nvcpus = 0', "vcpus: 1 to 32"),
        ('name = "x"\nvcpus = "2"', "vcpus: expected int"),
        ('name = "x"\nplatform = "kvm"', "platform: one of"),
        ('name = "x"\nmemory = 99999', "memory"),
        ('name = "bad name"', "not a valid domain name"),
        ('name = "x"\nworkloads = [1, 2]', "workloads: a list of strings"),
        ('name = "x"\nworkloads = ["callouts:count"]', "not key=value"),
        ('name = "x"\nvcpus = __import__("os")', "not a number"),
        ('name = "x"\nworkloads = [ "a"', "unclosed"),
        ("just words", "expected 'key = value'"),
    ],
)
def test_bad_files_say_what_is_wrong(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        parse(text)
