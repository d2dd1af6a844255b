"""Parsing, table-driven: SPECs, Docker link variables, env files; plus property tests."""

from __future__ import annotations

import json
import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from forkproxy import config
from forkproxy._metrics_main import IMPORT_PATH_VARIABLE
from forkproxy.config import (
    ConfigError,
    Endpoint,
    Link,
    Options,
    Sources,
    _nearest,
    build_links,
    check_metrics_port,
    check_options,
    links_from_env,
    merge_links,
    parse_aliases,
    parse_count,
    parse_env_file,
    parse_keepalive,
    parse_link_bind,
    parse_seconds,
    parse_spec,
    peer_text,
    sources_from_json,
    sources_to_json,
    unknown_variables,
)
from forkproxy.config import _overlap as overlap


def test_an_ipv4_mapped_address_is_written_one_way_on_every_python() -> None:
    """Python 3.13 writes ::ffff:127.0.0.1, 3.11 and 3.12 ::ffff:7f00:1: the image (3.13)
    and a 3.11 install said a listener and a target two ways, and on 3.11 `status --json`
    had the target one way and its resolved address (the kernel's) the other."""
    link = parse_spec("[::ffff:127.0.0.1]:0=[::ffff:7f00:1]:6379")
    assert (link.bind, link.target.host) == ("::ffff:127.0.0.1", "::ffff:127.0.0.1")
    assert parse_link_bind("::ffff:7f00:1") == "::ffff:127.0.0.1"
    assert parse_spec("[fd00::7f00:1]:1=[::1]:2").bind == "fd00::7f00:1"  # not mapped: as is


@pytest.mark.parametrize(
    ("address", "text"),
    [
        (("198.18.0.5", 41852), "198.18.0.5:41852"),
        (("2001:2::1", 80, 0, 0), "[2001:2::1]:80"),
        # A link-local peer: the interface's index tells two with the same address apart
        # (status, `denied` and `connect-failed` lines; the relay writes the same).
        (("fe80::2", 44304, 0, 3), "[fe80::2%3]:44304"),
    ],
)
def test_a_peer_address_is_written_with_its_zone(address: tuple[object, ...], text: str) -> None:
    assert peer_text(address) == text


LONGEST_NAME = ".".join(["a" * 63] * 3 + ["a" * 61])  # 253 characters, DNS's most


@pytest.mark.parametrize(
    ("spec", "bind", "port", "host", "target_port"),
    [
        ("6379=10.0.0.5:6379", "0.0.0.0", 6379, "10.0.0.5", 6379),
        ("127.0.0.1:7000=redis:6379", "127.0.0.1", 7000, "redis", 6379),
        ("[::]:6379=[fd00::5]:6379", "::", 6379, "fd00::5", 6379),
        ("[::1]:1=[FD00:0::5]:2", "::1", 1, "fd00::5", 2),
        ("0=db.example.internal.:5432", "0.0.0.0", 0, "db.example.internal.", 5432),
        ("65535=my_service-1:65535", "0.0.0.0", 65535, "my_service-1", 65535),
        (f"1={LONGEST_NAME}:5", "0.0.0.0", 1, LONGEST_NAME, 5),
        # Fully qualified, as `redis.`: the dot is no character of the name (was "longer
        # than 253 characters").
        (f"1={LONGEST_NAME}.:5", "0.0.0.0", 1, f"{LONGEST_NAME}.", 5),
    ],
)
def test_good_specs(spec: str, bind: str, port: int, host: str, target_port: int) -> None:
    assert parse_spec(spec) == Link(bind, port, Endpoint(host, target_port), (spec,))


@pytest.mark.parametrize(
    ("spec", "is_name"),
    [
        ("1=10.0.0.5:6379", False),
        ("1=[fd00::5]:6379", False),
        ("1=[fe80::1%lo]:6379", False),
        ("1=redis:6379", True),
        ("1=db.example.internal.:5432", True),
        ("1=my_service-1:1", True),
    ],
)
def test_a_target_knows_whether_it_is_a_name(spec: str, is_name: bool) -> None:
    """Only names are resolved again (--resolve-every); an address never changes."""
    assert parse_spec(spec).target.is_name is is_name


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "expected [BIND_ADDR:]LISTEN_PORT=HOST:PORT"),
        ("6379", "expected [BIND_ADDR:]LISTEN_PORT=HOST:PORT"),
        ("=10.0.0.5:6379", "listen port is missing"),
        ("6379=", "upstream HOST:PORT is missing"),
        ("6379=10.0.0.5", "expected HOST:PORT"),
        ("6379=10.0.0.5:", "port '' is not a number"),
        ("6379=:6379", "the host is empty"),
        ("65536=10.0.0.5:6379", "out of range"),
        ("6379=10.0.0.5:0", "out of range (1-65535)"),
        ("6379=10.0.0.5:99999999999", "out of range"),
        ("-1=10.0.0.5:6379", "is not a number"),
        ("abc=10.0.0.5:6379", "port 'abc' is not a number"),
        ("6379=10.0.0.5:http", "is not a number"),
        ("6379=10.0.0.5:٣", "is not a number"),  # a non-ASCII digit
        ("[::1=10.0.0.5:6379", "unclosed '['"),
        ("6379=[fd00::5:6379", "unclosed '['"),
        ("6379=[]:6379", "empty IPv6 address"),
        ("6379=[fd00::5]6379", "expected ':PORT' after ']'"),
        ("6379=fd00::5:6379", "IPv6 addresses must be in brackets"),
        ("6379=[10.0.0.5]:6379", "is not an IPv6 address"),
        ("6379=[fd00::zz]:6379", "is not an IPv6 address"),
        ("redis:6379=10.0.0.5:6379", "bind address 'redis' is not an IP address"),
        ("6379=$(reboot):6379", "is not a valid host name"),
        ("6379=`id`:6379", "is not a valid host name"),
        ("6379=a;rm -rf /:6379", "is not a valid host name"),
        ("6379=a|b:6379", "is not a valid host name"),
        ("6379=héllo:6379", "is not a valid host name"),
        ("6379=" + "a" * 300 + ":6379", "longer than 253"),
        (f"6379={LONGEST_NAME}a:6379", "longer than 253"),
        (f"6379={LONGEST_NAME}a.:6379", "longer than 253"),
        ("6379=" + "a" * 64 + ".com:6379", "is not a valid host name"),
        ("6379=-bad:6379", "is not a valid host name"),
        ("6379=10.0.0.256:6379", "is not a valid IPv4 address"),
        ("6379=a..b:6379", "is not a valid host name"),
    ],
)
def test_bad_specs_name_the_input(spec: str, message: str) -> None:
    assert message in spec_refusal(spec)


def spec_refusal(spec: str) -> str:
    """parse_spec's error for `spec`: one line, naming the SPEC."""
    with pytest.raises(ConfigError) as caught:
        parse_spec(spec)
    text = str(caught.value)
    assert "\n" not in text
    assert text.startswith("SPEC ")
    return text


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        # A link variable's value pasted: the error said "IPv6 addresses must be in brackets".
        ("7200=tcp://198.18.1.2:16379",
         "no scheme: drop 'tcp://'; expected [BIND_ADDR:]LISTEN_PORT=HOST:PORT, "
         "as in 7200=198.18.1.2:16379"),
        ("7200=UDP://198.18.1.2:16379", "drop 'UDP://' (forkproxy proxies TCP only)"),
        ("tcp://198.18.1.2:16379", "drop 'tcp://'"),
        # socat's addresses, and docker's -p: only the generic "expected ..." before.
        ("TCP4-LISTEN:6379,fork,reuseaddr",
         "socat syntax: write one SPEC, [BIND_ADDR:]LISTEN_PORT=HOST:PORT (use '=' between "
         "the listen port and the target): 6379=HOST:PORT"),
        ("TCP-LISTEN:6379,fork,bind=127.0.0.1 TCP:198.18.1.2:16379",
         ": 127.0.0.1:6379=198.18.1.2:16379"),
        ("tcp6-l:6379,bind=::1", ": [::1]:6379=HOST:PORT"),
        # IPv6's: TCP6-LISTEN listens on [::], and socat's bracketed bind address (both
        # gave a hint that listened on IPv4, or the generic one).
        ("TCP6-LISTEN:6379,fork TCP6:[fd00::5]:16379", ": [::]:6379=[fd00::5]:16379"),
        ("TCP6-LISTEN:6379,fork,bind=[::1]", ": [::1]:6379=HOST:PORT"),
        ("TCP-LISTEN:6379,bind=[fd00::1] TCP:198.18.1.2:16379",
         ": [fd00::1]:6379=198.18.1.2:16379"),
        ("TCP4:198.18.1.2:16379", "(use '=' between the listen port and the target): "
         "LISTEN_PORT=198.18.1.2:16379"),
        ("6379:198.18.1.2:16379", "expected [BIND_ADDR:]LISTEN_PORT=HOST:PORT: use '=' between "
         "the listen port and the target, as in 6379=198.18.1.2:16379"),
        ("127.0.0.1:6379:[fd00::5]:16379", "as in 127.0.0.1:6379=[fd00::5]:16379"),
        ("6379:6379", "HOST:PORT: use '=' between the listen port and the target"),
    ],
)
def test_a_spec_in_another_tools_syntax_says_how_to_write_it(spec: str, message: str) -> None:
    assert message in spec_refusal(spec)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        # A quoted "$SPECS", a compose `command` string, a list joined by commas: was
        # "IPv6 addresses must be in brackets", the rest read as the target's host.
        ("6379=redis:6379 6380=redis:6380", "2 SPECs in one argument: give each as an "
         "argument of its own, as in `serve 6379=redis:6379 6380=redis:6380`"),
        ("6379=redis:6379,6380=redis:6380", "as in `serve 6379=redis:6379 6380=redis:6380`"),
        ("1=a.test:1;\n2=b.test:2\t3=c.test:3 4=d.test:4",
         "4 SPECs in one argument: give each as an argument of its own, as in "
         "`serve 1=a.test:1 2=b.test:2 3=c.test:3 ...`"),
        # Three: every one shown, none left out ("..." only past three).
        ("1=a.test:1 2=b.test:2 3=c.test:3", "3 SPECs in one argument: give each as an "
         "argument of its own, as in `serve 1=a.test:1 2=b.test:2 3=c.test:3`"),
    ],
)
def test_several_specs_in_one_argument_are_told_apart(spec: str, message: str) -> None:
    assert message in spec_refusal(spec)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        # Pasted from a page that set `--` as a dash: was "expected [BIND_ADDR:]LISTEN_PORT=
        # HOST:PORT", and a reader looking at `—from-env` sees an option.
        ("\u2014from-env", "'\u2014' (U+2014) is no hyphen: an option is written with two "
         "ASCII hyphens, as in --from-env"),
        ("\u2013bind", "'\u2013' (U+2013) is no hyphen: an option is written with two ASCII "
         "hyphens, as in --bind"),
        ("\u2212\u2212grace=5", "(U+2212) is no hyphen: an option is written with two ASCII "
         "hyphens, as in --grace"),
        # A short option's letter as typed: -V is not -v (a long one's name is lowered).
        ("\u2013V", "'\u2013' (U+2013) is no hyphen: a short option is written with one "
         "ASCII hyphen, as in -V"),
    ],
)
def test_an_option_with_a_typographic_dash_says_so(spec: str, message: str) -> None:
    assert message in spec_refusal(spec)


@pytest.mark.parametrize("spec", ["6379=redis:6379 junk", " 6379=redis:6379 "])
def test_one_spec_with_more_around_it_is_not_taken_for_several(spec: str) -> None:
    assert "in one argument" not in spec_refusal(spec)


DOCKER_LINK_ENV = {
    "REDIS_PORT": "tcp://172.17.0.5:6379",
    "REDIS_PORT_6379_TCP": "tcp://172.17.0.5:6379",
    "REDIS_PORT_6379_TCP_ADDR": "172.17.0.5",
    "REDIS_PORT_6379_TCP_PORT": "6379",
    "REDIS_PORT_6379_TCP_PROTO": "tcp",
    "REDIS_NAME": "/consumer/redis",
    "REDIS_ENV_REDIS_VERSION": "7.0",
    "HOME": "/root",
    "PATH": "/usr/bin",
}


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        # The plain link, as Docker sets it with all its siblings: one listener.
        (DOCKER_LINK_ENV, [("0.0.0.0", 6379, "172.17.0.5", 6379, ("REDIS_PORT_6379_TCP",))]),
        # An ambassador linked to an ambassador: the re-exported variable is not a link.
        (
            {**DOCKER_LINK_ENV, "REDIS_ENV_REDIS_PORT_6379_TCP": "tcp://198.18.0.9:6379"},
            [("0.0.0.0", 6379, "172.17.0.5", 6379, ("REDIS_PORT_6379_TCP",))],
        ),
        # Two aliases (Compose) to the same target: one listener, both names.
        (
            {"CACHE_PORT_6379_TCP": "tcp://10.0.0.5:6379", "DB_PORT_6379_TCP": "tcp://10.0.0.5:6379"},
            [("0.0.0.0", 6379, "10.0.0.5", 6379, ("CACHE_PORT_6379_TCP", "DB_PORT_6379_TCP"))],
        ),
        # Several ports of one container, by alias then port as a number (text order
        # put 10000 before 443 before 80).
        (
            {"WEB_PORT_80_TCP": "tcp://10.0.0.7:80", "WEB_PORT_443_TCP": "tcp://10.0.0.7:443",
             "WEB_PORT_10000_TCP": "tcp://10.0.0.7:10000", "API_PORT_8080_TCP": "tcp://api:8080"},
            [
                ("0.0.0.0", 8080, "api", 8080, ("API_PORT_8080_TCP",)),
                ("0.0.0.0", 80, "10.0.0.7", 80, ("WEB_PORT_80_TCP",)),
                ("0.0.0.0", 443, "10.0.0.7", 443, ("WEB_PORT_443_TCP",)),
                ("0.0.0.0", 10000, "10.0.0.7", 10000, ("WEB_PORT_10000_TCP",)),
            ],
        ),
        # The seed's remote ambassador: the listen port and the target port may differ.
        ({"REDIS_PORT_1234_TCP": "tcp://192.0.2.1:6379"},
         [("0.0.0.0", 1234, "192.0.2.1", 6379, ("REDIS_PORT_1234_TCP",))]),
        # An alias with _PORT_ inside it.
        ({"MY_PORT_APP_PORT_8080_TCP": "tcp://app:8080"},
         [("0.0.0.0", 8080, "app", 8080, ("MY_PORT_APP_PORT_8080_TCP",))]),
        # IPv6 and host names are accepted.
        ({"DB_PORT_5432_TCP": "tcp://[fd00::5]:5432"},
         [("0.0.0.0", 5432, "fd00::5", 5432, ("DB_PORT_5432_TCP",))]),
    ],
)
def test_link_variable_rules(
    env: dict[str, str], expected: list[tuple[str, int, str, int, tuple[str, ...]]]
) -> None:
    table = build_links([], env)
    got = [(x.bind, x.port, x.target.host, x.target.port, x.names) for x in table.links]
    assert got == expected


def test_udp_and_sctp_links_are_reported_and_skipped() -> None:
    """SCTP was skipped without a word: Docker writes `_SCTP` link variables too."""
    env = {"DNS_PORT_53_UDP": "udp://10.0.0.2:53", "DNS_PORT_53_TCP": "tcp://10.0.0.2:53",
           "SIG_PORT_3868_SCTP": "sctp://10.0.0.3:3868"}
    table = build_links([], env)
    assert [link.names for link in table.links] == [("DNS_PORT_53_TCP",)]
    assert table.warnings == ("DNS_PORT_53_UDP: UDP links are not proxied; skipped",
                              "SIG_PORT_3868_SCTP: SCTP links are not proxied; skipped")


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"REDIS_PORT_6379_TCP": "10.0.0.5:6379"}, "variable REDIS_PORT_6379_TCP: expected tcp://"),
        ({"REDIS_PORT_6379_TCP": "tcp://"}, "variable REDIS_PORT_6379_TCP: expected HOST:PORT"),
        ({"REDIS_PORT_6379_TCP": "tcp://10.0.0.5:"}, "REDIS_PORT_6379_TCP: port '' is not"),
        # What Docker writes for a linked container without an IPv4 address.
        ({"REDIS_PORT_6379_TCP": "tcp://:6379"},
         "variable REDIS_PORT_6379_TCP: the host is empty, as Docker writes it for a linked "
         "container without an IPv4 address: set the variable yourself (-e "
         "REDIS_PORT_6379_TCP=tcp://NAME:PORT)"),
        ({"REDIS_PORT_6379_TCP": "tcp://10.0.0.5:0"}, "REDIS_PORT_6379_TCP: port '0' is out"),
        ({"REDIS_PORT_99999_TCP": "tcp://10.0.0.5:1"}, "REDIS_PORT_99999_TCP: port '99999'"),
        ({"REDIS_PORT_0_TCP": "tcp://10.0.0.5:1"}, "REDIS_PORT_0_TCP: port '0' is out"),
        ({"REDIS_PORT_6379_TCP": "tcp://$(touch /tmp/x):1"}, "REDIS_PORT_6379_TCP: '$(touch"),
        ({"REDIS_PORT_6379_TCP": "tcp://a b:1"}, "REDIS_PORT_6379_TCP: 'a b' is not"),
        ({"REDIS_PORT_6379_TCP": "tcp://[::1:6379"}, "REDIS_PORT_6379_TCP: unclosed '['"),
        (
            {"A_PORT_6379_TCP": "tcp://10.0.0.5:6379", "B_PORT_6379_TCP": "tcp://10.0.0.6:6379"},
            "port 6379 is linked twice to different targets: A_PORT_6379_TCP -> 10.0.0.5:6379 "
            "and B_PORT_6379_TCP -> 10.0.0.6:6379",
        ),
        ({"REDIS_PORT_6379_TCP": '"tcp://10.0.0.5:6379"'},
         """REDIS_PORT_6379_TCP: expected tcp://HOST:PORT, got '"tcp://10.0.0.5:6379"': """
         "remove the quotes"),
        ({"HOME": "/root"}, "no links found"),
        ({"REDIS_ENV_X_PORT_1_TCP": "tcp://10.0.0.5:1"},
         "no links found: no SPEC given, and no <ALIAS>_PORT_<N>_TCP variable in the "
         "environment; ignored 1 variable, REDIS_ENV_X_PORT_1_TCP: an <ALIAS>_ENV_... "
         "variable is a linked container's own environment re-exported by Docker"),
        ({"A_ENV_X_PORT_1_TCP": "1", "B_ENV_PORT_2_TCP": "2", "C_ENV_X_PORT_3_TCP": "3",
          "D_ENV_X_PORT_4_UDP": "4"},
         "; ignored 3 variables, A_ENV_X_PORT_1_TCP, B_ENV_PORT_2_TCP and 1 more: "),
    ],
)
def test_bad_link_variables_name_the_variable(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_links([], env)
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


# What a Kubernetes pod sees (kubelet's envvars.go: every service of the namespace, the
# API server's among them), with two services on port 80 and a UDP port.
POD_ENV = {
    "KUBERNETES_SERVICE_HOST": "10.96.0.1",
    "KUBERNETES_SERVICE_PORT": "443",
    "KUBERNETES_PORT": "tcp://10.96.0.1:443",
    "KUBERNETES_PORT_443_TCP": "tcp://10.96.0.1:443",
    "KUBERNETES_PORT_443_TCP_PROTO": "tcp",
    "WEB_PORT_80_TCP": "tcp://10.96.3.3:80",
    "API_PORT_80_TCP": "tcp://10.96.4.4:80",
    "REDIS_SERVICE_HOST": "10.96.5.5",
    "REDIS_PORT_6379_TCP": "tcp://10.96.5.5:6379",
    "MY_DB_PORT_5432_TCP": "tcp://10.96.6.6:5432",
    "MY_DB_PORT_5432_UDP": "udp://10.96.6.6:5432",
    "BROKEN_PORT_1_TCP": "not a link",
}


def test_link_takes_only_the_aliases_it_names() -> None:
    """In a Kubernetes pod --from-env took every service of the namespace: it refused to
    start wherever two services share a port, and listened on 443 for the API server.
    --alias names the aliases to take; the rest are not even parsed (BROKEN_ is no error),
    and their UDP variables are not reported."""
    table = build_links([], POD_ENV, aliases=("REDIS",))
    assert [(x.port, str(x.target), x.names) for x in table.links] == [
        (6379, "10.96.5.5:6379", ("REDIS_PORT_6379_TCP",))]
    assert table.warnings == ()
    table = build_links([], POD_ENV, aliases=parse_aliases(["my-db,redis"]))
    assert [x.names for x in table.links] == [("MY_DB_PORT_5432_TCP",), ("REDIS_PORT_6379_TCP",)]
    assert table.warnings == ("MY_DB_PORT_5432_UDP: UDP links are not proxied; skipped",)


def test_link_takes_from_the_env_file_too_and_reports_only_its_overrides() -> None:
    env_file = ("links.env", "REDIS_PORT_6379_TCP=tcp://10.0.0.6:6379\n"
                             "WEB_PORT_80_TCP=tcp://10.0.0.7:80\n")
    table = build_links([], POD_ENV, env_file, aliases=("REDIS",))
    assert [(x.names, str(x.target)) for x in table.links] == [
        (("REDIS_PORT_6379_TCP",), "10.0.0.6:6379")]
    assert [x.split(" is set")[0] for x in table.overrides] == ["REDIS_PORT_6379_TCP"]
    # From the file alone, with a SPEC beside it: the SPEC is not filtered.
    table = build_links(["7000=10.0.0.8:1"], None, env_file, aliases=("WEB",))
    assert [x.names for x in table.links] == [("7000=10.0.0.8:1",), ("WEB_PORT_80_TCP",)]


def test_link_takes_an_alias_whose_name_holds_an_env_word() -> None:
    """Without --alias, `<ALIAS>_ENV_...` is a re-export and ignored; named by --alias, the
    alias is the user's word that it is a link."""
    env = {"APP_ENV_DB_PORT_5432_TCP": "tcp://10.0.0.5:5432"}
    with pytest.raises(ConfigError, match="no links found"):
        build_links([], env)
    [link] = build_links([], env, aliases=("APP_ENV_DB",)).links
    assert link.names == ("APP_ENV_DB_PORT_5432_TCP",)


@pytest.mark.parametrize(
    ("environ", "env_file", "aliases", "message"),
    [
        (POD_ENV, None, ("NOPE",),
         "--alias selects NOPE, but no NOPE_PORT_<N>_TCP variable is in the environment"),
        # Only a UDP variable: still none to proxy (and it says why that one is not).
        ({"DNS_PORT_53_UDP": "udp://10.0.0.2:53"}, ("l.env", ""), ("DNS",),
         "--alias selects DNS, but no DNS_PORT_<N>_TCP variable is in the environment or "
         "env file 'l.env'; DNS_PORT_53_UDP: UDP links are not proxied; skipped"),
        (None, None, ("REDIS",),
         "--alias selects among link variables: give --from-env or --env-file too"),
        # A selected variable's own error is still reported, without the pod's hint.
        ({**POD_ENV, "REDIS_PORT_6379_TCP": "tcp://x"}, None, ("REDIS",),
         "variable REDIS_PORT_6379_TCP: expected HOST:PORT, got 'x'"),
    ],
)
def test_link_errors(environ: dict[str, str] | None, env_file: tuple[str, str] | None,
                     aliases: tuple[str, ...], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_links(["7000=10.0.0.8:1"] if environ is None else [], environ, env_file,
                    aliases=aliases)
    assert str(caught.value) == message


def test_a_clash_of_variables_says_to_choose_with_alias() -> None:
    """The error in a pod named two services' variables and stopped there: the user had
    to know that Kubernetes sets them. Elsewhere (Compose v1's scaled service: DB_1_ and
    DB_2_ on one port; two Docker links on one port) it says how to choose; between
    SPECs alone, as it was."""
    clash = ("port 80 is linked twice to different targets: API_PORT_80_TCP -> 10.96.4.4:80 "
             "and WEB_PORT_80_TCP -> 10.96.3.3:80")
    pod = {k: v for k, v in POD_ENV.items() if not k.startswith("BROKEN")}
    with pytest.raises(ConfigError) as caught:
        build_links([], pod)
    assert str(caught.value) == clash + (" (in a Kubernetes pod every service sets such "
                                         "variables: choose the links with --alias ALIAS)")
    del pod["KUBERNETES_SERVICE_HOST"]
    with pytest.raises(ConfigError) as caught:
        build_links([], pod)
    assert str(caught.value) == clash + " (to take only some aliases' variables: --alias ALIAS)"
    with pytest.raises(ConfigError) as caught:
        build_links(["80=10.0.0.1:80", "80=10.0.0.2:80"], {"HOME": "/root"})
    assert str(caught.value).endswith("80=10.0.0.2:80 -> 10.0.0.2:80"), caught.value


def test_an_empty_host_in_the_env_file_is_not_blamed_on_docker() -> None:
    """Docker writes `tcp://:6379` into the environment for a linked container without an
    IPv4 address, and that error says so (test_bad_link_variables_name_the_variable); an
    env file is written by hand or a template, and its empty host is only that."""
    with pytest.raises(ConfigError) as caught:
        build_links([], env_file=("/e.env", "REDIS_PORT_6379_TCP=tcp://:6379\n"))
    assert str(caught.value) == "variable REDIS_PORT_6379_TCP ('/e.env'): the host is empty"


def test_a_udp_port_range_is_one_warning() -> None:
    """A linked container with EXPOSE 10000-10999/udp: 1,000 `link-skipped` lines at
    start, one per port. One per alias and protocol now, with the count."""
    env = {f"RTP_PORT_{port}_UDP": f"udp://10.0.0.2:{port}" for port in range(10000, 11000)}
    env.update({"RTP_PORT_5060_TCP": "tcp://10.0.0.2:5060", "RTP_PORT_5060_SCTP": "sctp://x:1",
                "SIP_PORT_5060_UDP": "udp://10.0.0.3:5060"})
    table = build_links([], env)
    assert table.warnings == (
        "RTP_PORT_5060_SCTP: SCTP links are not proxied; skipped",
        "RTP_PORT_10000_UDP and 999 more RTP_PORT_<N>_UDP: UDP links are not proxied; skipped",
        "SIP_PORT_5060_UDP: UDP links are not proxied; skipped")


LITERAL = ": values are taken literally, as `docker run --env-file` does: remove the quotes"


def test_a_variables_value_that_only_ends_in_a_quote_is_told_values_are_literal() -> None:
    """`FORKPROXY_GRACE=5"` (a quote left at one end by an edit, or by a template): the
    quote is part of the value, as at the start (test_cli's quoted-variable test)."""
    assert config.name_variable(
        "--grace '5\"': not a number of seconds", {"--grace": "FORKPROXY_GRACE"},
        {"FORKPROXY_GRACE": '5"'}) == (
        "FORKPROXY_GRACE (--grace) '5\"': not a number of seconds" + LITERAL)


def test_a_quoted_env_file_variable_is_not_blamed_for_another_options_error() -> None:
    """FORKPROXY_ENV_FILE in quotes, and an error that is not the env file's (--grace's,
    typed on the command line): told as it is, without the env file's quotes hint."""
    message = "--grace 'x': not a number of seconds"
    assert config.name_variable(message, {"--env-file": "FORKPROXY_ENV_FILE"},
                                {"FORKPROXY_ENV_FILE": '"/e.env"'}) == message
    # The env file's own error names the variable, and says so.
    assert config.name_variable("cannot read env file '\"/e.env\"': No such file",
                                {"--env-file": "FORKPROXY_ENV_FILE"},
                                {"FORKPROXY_ENV_FILE": '"/e.env"'}) == (
        "cannot read FORKPROXY_ENV_FILE (--env-file) '\"/e.env\"': No such file" + LITERAL)


def test_two_udp_variables_of_one_alias_are_one_warning() -> None:
    """The fewest that share a line: two (one would say `and 0 more`)."""
    env = {"DNS_PORT_53_UDP": "udp://10.0.0.2:53", "DNS_PORT_5353_UDP": "udp://10.0.0.2:5353",
           "DNS_PORT_53_TCP": "tcp://10.0.0.2:53"}
    assert build_links([], env).warnings == (
        "DNS_PORT_53_UDP and 1 more DNS_PORT_<N>_UDP: UDP links are not proxied; skipped",)


def test_a_link_variable_whose_alias_has_a_dash_is_named_not_skipped_silently() -> None:
    """`redis-cache_PORT_6379_TCP`, written by hand (Docker writes the alias with '-' as
    '_'), was skipped without a word: beside another link nothing said why its port was
    not listening; alone, "no links found" named nothing. A warning names it now, and the
    errors that follow say it: no links found, an --alias that selects nothing."""
    why = ("not a link variable: an alias is letters, digits, '_' and '.' (Docker writes "
           "'-' as '_'); skipped")
    env = {"redis-cache_PORT_6379_TCP": "tcp://10.0.0.5:6379", "DB_PORT_5432_TCP": "tcp://db:5432"}
    table = build_links([], env)
    assert [x.names for x in table.links] == [("DB_PORT_5432_TCP",)]
    assert table.warnings == (f"variable 'redis-cache_PORT_6379_TCP': {why}",)
    table = build_links([], None, env_file=("links.env", "db-1_PORT_5432_TCP=tcp://db:5432\n"
                                                         "DB_PORT_5432_TCP=tcp://db:5432\n"))
    assert table.warnings == (f"variable 'db-1_PORT_5432_TCP' ('links.env'): {why}",)
    with pytest.raises(ConfigError) as raised:
        build_links([], {"redis-cache_PORT_6379_TCP": "tcp://10.0.0.5:6379"})
    assert str(raised.value).endswith(
        f"variable in the environment; variable 'redis-cache_PORT_6379_TCP': {why}")
    with pytest.raises(ConfigError) as raised:
        build_links([], {"redis-cache_PORT_6379_TCP": "tcp://10.0.0.5:6379"},
                    aliases=("REDIS_CACHE",))
    assert str(raised.value) == (
        "--alias selects REDIS_CACHE, but no REDIS_CACHE_PORT_<N>_TCP variable is in the "
        f"environment; variable 'redis-cache_PORT_6379_TCP': {why}")
    # --alias's selection holds: another alias's misspelt variable is not its concern.
    table = build_links([], env, aliases=("DB",))
    assert (table.warnings, [x.names for x in table.links]) == ((), [("DB_PORT_5432_TCP",)])


def test_a_kubernetes_named_service_port_is_no_link() -> None:
    """A service port named `8080-tcp` (`oc new-app` names them so) makes kubelet set
    MYAPP_SERVICE_PORT_8080_TCP=8080 beside the link variables: it matched the link
    pattern, and one such service in the namespace made --from-env exit 2 ("expected
    tcp://HOST:PORT, got '8080'"); a `5060-udp` port was reported as a UDP link."""
    env = {"MYAPP_SERVICE_HOST": "172.30.12.5", "MYAPP_SERVICE_PORT": "8080",
           "MYAPP_SERVICE_PORT_8080_TCP": "8080", "MYAPP_PORT_8080_TCP": "tcp://172.30.12.5:8080",
           "SIP_SERVICE_PORT_5060_UDP": "5060"}
    table = build_links([], env)
    assert [x.names for x in table.links] == [("MYAPP_PORT_8080_TCP",)]
    assert table.warnings == ()
    # Ports named `port-5432-tcp` or `x-port-5432-tcp` (valid names: at most 15 characters,
    # letters, digits and '-') end the variable's name the same way; the alias then ends
    # in, or holds, _SERVICE_PORT: it made --from-env exit 2 too.
    env = {"PG_SERVICE_PORT_PORT_5432_TCP": "5432", "PG_SERVICE_PORT_X_PORT_5432_TCP": "5432",
           "PG_PORT_5432_TCP": "tcp://10.96.0.7:5432"}
    assert [x.names for x in build_links([], env).links] == [("PG_PORT_5432_TCP",)]
    # An alias that ends in _SERVICE is still a link, checked as one, when its value is not
    # a bare port number.
    [link] = build_links([], {"X_SERVICE_PORT_1_TCP": "tcp://10.0.0.1:1"}).links
    assert link.names == ("X_SERVICE_PORT_1_TCP",)
    [link] = build_links([], {"X_SERVICE_PORT_PORT_1_TCP": "tcp://10.0.0.1:1"}).links
    assert link.names == ("X_SERVICE_PORT_PORT_1_TCP",)
    for value in ("10.0.0.1:1", "\u0663"):  # not ASCII digits: '٣'.isdigit() is True
        with pytest.raises(ConfigError, match="X_SERVICE_PORT_1_TCP: expected tcp://"):
            build_links([], {"X_SERVICE_PORT_1_TCP": value})


@pytest.mark.parametrize(
    ("env", "end"),
    [
        # Docker 29 sets no variables for --link (moby/moby#50719): say so.
        ({"HOME": "/root", "REDIS_NAME": "/amb/redis"},
         "variable in the environment; since Docker Engine 29, `docker run --link` sets no "
         "link variables (unless its daemon runs with "
         "DOCKER_KEEP_DEPRECATED_LEGACY_LINKS_ENV_VARS=1): set them with -e, as in -e "
         "REDIS_PORT_6379_TCP=tcp://redis:6379"),
        # Only UDP variables: say that they were skipped, not only that nothing was found.
        ({"DNS_PORT_53_UDP": "udp://10.0.0.2:53", "NTP_PORT_123_UDP": "udp://10.0.0.3:123"},
         "variable in the environment; DNS_PORT_53_UDP: UDP links are not proxied; skipped "
         "(and 1 more)"),
        # In a pod: enableServiceLinks: false, most likely; no word about Docker.
        ({"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, "variable in the environment"),
    ],
)
def test_no_links_found_says_why(env: dict[str, str], end: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_links([], env)
    assert str(caught.value).startswith("no links found: no SPEC given, and no ")
    assert str(caught.value).endswith(end), caught.value


@pytest.mark.parametrize(
    ("texts", "expected"),
    [
        (["redis"], ("REDIS",)),
        (["my-db", "REDIS", "redis,app.db"], ("MY_DB", "REDIS", "APP.DB")),
        # FORKPROXY_ALIAS="redis, db": click splits it at the space.
        (["redis,", "db"], ("REDIS", "DB")),
        (["A_1"], ("A_1",)),
    ],
)
def test_alias_options_are_spelled_as_variable_names_spell_them(
    texts: list[str], expected: tuple[str, ...]
) -> None:
    """Docker and Kubernetes upper-case the name and write '-' as '_' (but keep '.')."""
    assert parse_aliases(texts) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "--alias '': empty: name an alias (without --alias and FORKPROXY_ALIAS every link "
             "variable is taken)"),
        (" ", "--alias ' ': empty"),
        ("redis:db", "--alias 'redis:db': give the alias alone: for `docker run --link "
                     "NAME:ALIAS`, the ALIAS"),
        ("re dis", "--alias 're dis': not a link alias (letters, digits, '_', '-', '.'; "
                   "several separated by commas)"),
        (",", "--alias ',': not a link alias"),
        ("$(id)", "--alias '$(id)': not a link alias"),
    ],
)
def test_bad_alias_options(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_aliases([text])
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("A" + "1" * 5000 + "_PORT_6379_TCP", "tcp://10.0.0.5:x", ": port 'x' is not a number"),
        ("A_PORT_" + "1" * 5000 + "_TCP", "tcp://10.0.0.5:1", ": port '1111"),
    ],
)
def test_a_long_variable_name_is_shortened_in_its_error(name: str, value: str,
                                                        reason: str) -> None:
    """A 5000-character variable name was written whole into its error line, where values
    are shortened to 80 characters (quoted()): the name is shortened the same way."""
    with pytest.raises(ConfigError) as caught:
        build_links([], {name: value})
    message = str(caught.value)
    assert message.startswith(f"variable {name[:77]}...{reason}"), message
    assert len(message) < 250, message


@pytest.mark.parametrize("spec", ["127.0.0.1:0=127.0.0.1:6379", "0=127.0.0.1:6379",
                                  "127.0.0.1:7001=127.0.0.1:6379"])
def test_the_same_spec_given_twice_is_one_link_named_once(spec: str) -> None:
    """A SPEC typed twice merged into one listener named twice (`link=X,X` in the log,
    status and metrics). Port 0 included: two listeners cannot both be named X (status,
    metrics and reload know a link by its name), and a non-zero port given twice was
    already one listener. Now one link, named once; a different SPEC still is its own."""
    [link] = build_links([spec, spec]).links
    assert link.names == (spec,)
    assert link.key == parse_spec(spec).key
    other = spec.replace("7001=", "7002=").replace("6379", "6380")
    assert [x.names for x in build_links([spec, other, spec]).links] == [(spec,), (other,)]


def test_a_name_in_two_cases_is_one_target() -> None:
    """DNS compares names without case (RFC 4343): `redis` in one variable and `REDIS`
    in another on the same port were "linked twice to different targets" and serve
    exited 2. One link now, spelled as first given; a trailing dot still differs (`redis.`
    skips the search domains that `redis` may take)."""
    [link] = build_links([], {"A_PORT_6379_TCP": "tcp://redis:6379",
                              "B_PORT_6379_TCP": "tcp://REDIS:6379"}).links
    assert link.names == ("A_PORT_6379_TCP", "B_PORT_6379_TCP")
    assert str(link.target) == "redis:6379"
    with pytest.raises(ConfigError, match="linked twice to different targets"):
        build_links([], {"A_PORT_6379_TCP": "tcp://redis:6379",
                         "B_PORT_6379_TCP": "tcp://redis.:6379"})
    with pytest.raises(ConfigError, match="linked twice to different targets"):
        build_links([], {"A_PORT_6379_TCP": "tcp://redis:6379",
                         "B_PORT_6379_TCP": "tcp://redis:6380"})
    # An interface name's case counts (Linux's are case-sensitive): not a DNS name.
    with pytest.raises(ConfigError, match="linked twice to different targets"):
        build_links(["1=[fe80::1%eth0]:1", "1=[fe80::1%ETH0]:1"])


@pytest.mark.parametrize(
    ("specs", "environ", "looped"),
    [
        (["6379=localhost:6379"], None, "6379=localhost:6379 connects to its own listener "
                                         "(0.0.0.0:6379 -> localhost:6379): "),
        (["127.0.0.1:7000=127.0.0.1:7000"], None, "(127.0.0.1:7000 -> 127.0.0.1:7000)"),
        (["[::]:7000=127.0.0.1:7000"], None, "([::]:7000 -> 127.0.0.1:7000)"),
        (["[::]:7000=[::1]:7000"], None, "([::]:7000 -> [::1]:7000)"),
        (["[::1]:7000=LOCALHOST.:7000"], None, "([::1]:7000 -> LOCALHOST.:7000)"),
        (["7000=[::ffff:127.0.0.1]:7000"], None, "(0.0.0.0:7000 -> [::ffff:127.0.0.1]:7000)"),
        (["7000=0.0.0.0:7000"], None, "(0.0.0.0:7000 -> 0.0.0.0:7000)"),
        (["[::]:7000=[::]:7000"], None, "([::]:7000 -> [::]:7000)"),
        (["10.0.0.5:7000=10.0.0.5:7000"], None, "(10.0.0.5:7000 -> 10.0.0.5:7000)"),
        (["[fe80::1%lo]:7000=[fe80::1%lo]:7000"], None,
         "([fe80::1%lo]:7000 -> [fe80::1%lo]:7000)"),
        ([], {"REDIS_PORT_6379_TCP": "tcp://localhost:6379"},
         "REDIS_PORT_6379_TCP connects to its own listener (0.0.0.0:6379 -> localhost:6379)"),
        # Not its own listener: another port, address or family, a name.
        (["6379=localhost:6380"], None, None),
        (["127.0.0.2:7000=127.0.0.1:7000"], None, None),
        (["[::1]:7000=127.0.0.1:7000"], None, None),
        (["0.0.0.0:7000=[::1]:7000"], None, None),
        (["7000=redis:7000"], None, None),
        (["7000=10.0.0.5:7000"], None, None),  # maybe this host's, maybe not: no I/O here
        (["10.0.0.6:7000=10.0.0.5:7000"], None, None),
        (["127.0.0.1:7000=0.0.0.0:7001"], None, None),
    ],
)
def test_a_link_to_its_own_listener_is_refused(
    specs: list[str], environ: dict[str, str] | None, looped: str | None,
) -> None:
    """`6379=localhost:6379` in a container: every client's child connected back to the
    proxy, whose next child did the same, until --max-children was used up; then every
    link stopped serving, `check` said ok and no line was logged (a hunt with socat's
    test cases). Refused at start (and so at a reload) now."""
    if looped is None:
        assert build_links(specs, environ).links
        return
    with pytest.raises(ConfigError) as caught:
        build_links(specs, environ)
    assert looped in str(caught.value)
    assert str(caught.value).endswith(": name the server's host")  # not `--alias`'s hint
    # Why it is this host, said of the host as given (it said "localhost" of them all).
    host = re.search(r" -> (.*):\d+\)", looped)
    assert host is not None
    given = host[1].removeprefix("[").removesuffix("]")
    why = {"0.0.0.0": "connects to this host", "::": "connects to this host",
           "10.0.0.5": "is an address this proxy listens on",
           "fe80::1%lo": "is an address this proxy listens on"}.get(given, "is this host")
    in_container = " (in a container, the container itself)" if why[-4:] == "host" else ""
    assert str(caught.value).endswith(
        f"none is left; {given} {why}{in_container}: name the server's host"), caught.value


@pytest.mark.parametrize(
    ("specs", "environ", "ring", "said"),
    [
        (["6379=127.0.0.1:6380", "6380=127.0.0.1:6379"], None,
         "6379=127.0.0.1:6380 (0.0.0.0:6379 -> 127.0.0.1:6380), "
         "6380=127.0.0.1:6379 (0.0.0.0:6380 -> 127.0.0.1:6379): ", "127.0.0.1 is this host"),
        # Three links, through localhost and 0.0.0.0, entered from a fourth that chains in.
        (["7003=127.0.0.1:7000", "7000=localhost:7001", "127.0.0.1:7001=0.0.0.0:7002",
          "[::]:7002=[::ffff:127.0.0.1]:7000"], None,
         "7000=localhost:7001 (0.0.0.0:7000 -> localhost:7001), 127.0.0.1:7001=0.0.0.0:7002 "
         "(127.0.0.1:7001 -> 0.0.0.0:7002), [::]:7002=[::ffff:127.0.0.1]:7000 "
         "([::]:7002 -> [::ffff:127.0.0.1]:7000): ",
         "localhost and ::ffff:127.0.0.1 are this host, 0.0.0.0 connects to this host"),
        ([], {"A_PORT_7000_TCP": "tcp://127.0.0.1:7001",
              "B_PORT_7001_TCP": "tcp://localhost:7000"},
         "A_PORT_7000_TCP (0.0.0.0:7000 -> 127.0.0.1:7001), "
         "B_PORT_7001_TCP (0.0.0.0:7001 -> localhost:7000): ",
         "127.0.0.1 and localhost are this host"),
        # A chain through the proxy's own listeners that ends elsewhere is no ring.
        (["7000=127.0.0.1:7001", "7001=127.0.0.1:7002", "7002=10.0.0.5:7000"], None, None, ""),
        (["127.0.0.1:7000=127.0.0.1:7001", "127.0.0.1:7001=127.0.0.2:7000"], None, None, ""),
        (["[::1]:7000=127.0.0.1:7001", "127.0.0.1:7001=127.0.0.1:7000"], None, None, ""),
        (["7000=redis:7001", "7001=127.0.0.1:7000"], None, None, ""),  # a name: not looked up
    ],
)
def test_links_that_reach_one_another_in_a_ring_are_refused(
    specs: list[str], environ: dict[str, str] | None, ring: str | None, said: str,
) -> None:
    """`6379=127.0.0.1:6380 6380=127.0.0.1:6379` (or an env file whose reload pointed one
    link at another's port) was taken: one client's children connected round the ring
    until --max-children was used up, every link stopped serving, `check` said ok, and a
    reload that undid the ring left them all there, each half-closed (a model-based hunt
    of reloads). Refused at start, and so at a reload, as a link to its own listener is."""
    if ring is None:
        assert build_links(specs, environ).links
        return
    with pytest.raises(ConfigError) as caught:
        build_links(specs, environ)
    assert f"links connect to one another's listeners in a ring: {ring}" in str(caught.value)
    assert str(caught.value).endswith(f"none is left; {said} (in a container, the container "
                                      "itself): name the server's host"), caught.value


@pytest.mark.parametrize(
    ("specs", "asked"),
    [
        (["7000=10.0.0.5:7000"], {"10.0.0.5": "10.0.0.5:7000"}),  # the usual link: one
        (["[::]:7000=[fd00::1]:7000"], {"fd00::1": "[fd00::1]:7000"}),
        (["[::]:7000=[::ffff:10.0.0.5]:7000"], {"10.0.0.5": "[::ffff:10.0.0.5]:7000"}),
        (["[::]:7000=[fe80::1%eth0]:7000"], {"fe80::1%eth0": "[fe80::1%eth0]:7000"}),
        # One link-local address on two interfaces is two: this host's on one, perhaps a
        # neighbour's on the other. Keyed by the address alone, only the first was asked.
        (["[::]:7000=[fe80::1%eth0]:7000", "[::]:7001=[fe80::1%eth1]:7001"],
         {"fe80::1%eth0": "[fe80::1%eth0]:7000", "fe80::1%eth1": "[fe80::1%eth1]:7001"}),
        # One per address, whatever the port; a ring's links alike.
        (["7000=10.0.0.5:7001", "7001=10.0.0.5:7000", "7002=10.0.0.6:7002"],
         {"10.0.0.5": "10.0.0.5:7001", "10.0.0.6": "10.0.0.6:7002"}),
        # No listener that could take it: none asked.
        (["7000=10.0.0.5:7001"], {}),  # no listener on its port
        (["127.0.0.1:7000=10.0.0.5:7000"], {}),  # no wildcard on it
        (["0.0.0.0:7000=[fd00::1]:7000"], {}),  # a wildcard of the other family
        (["7000=redis:7000"], {}),  # a name: never looked up at start
        # Judged without asking (build_links refuses them): loopback, unspecified.
        (["7000=127.0.0.2:7000"], {}),
        (["[::]:7000=[::]:7000"], {}),
    ],
)
def test_only_literal_targets_a_wildcard_listener_would_take_are_asked_about(
    specs: list[str], asked: dict[str, str]
) -> None:
    """read_links asks the kernel about these alone (config.py does no I/O): the usual
    `6379=10.0.0.5:6379` costs one tiny probe, and a target no listener could take none."""
    links = [parse_spec(spec, "0.0.0.0") for spec in specs]
    found = config.own_address_candidates(links)
    assert {address: str(target) for address, target in found.items()} == asked


def test_each_ipv6_literal_target_is_asked_whether_this_host_can_send_to_it_once() -> None:
    """read_links asks the kernel (listeners.unsendable) about each IPv6-literal target's
    address once, with its zone, whatever the port; names never (not looked up at start),
    nor IPv4 addresses, mapped ones too. Each link to an address found unsendable is a
    line of its own, naming the link and what to give instead."""
    specs = ["7000=[::1]:7000", "7001=[::1]:7001", "7002=[fe80::1%eth0]:7002",
             "7003=redis:7003", "7004=10.0.0.5:7004", "7005=[::ffff:10.0.0.5]:7005",
             "7006=[2001:db8::5]:7006"]
    links = [parse_spec(spec, "0.0.0.0") for spec in specs]
    found = config.literal_targets(links)
    assert {address: str(target) for address, target in found.items()} == {
        "::1": "[::1]:7000", "fe80::1%eth0": "[fe80::1%eth0]:7002",
        "2001:db8::5": "[2001:db8::5]:7006"}
    assert config.unreachable_links(links, {}) == ()
    said = config.unreachable_links(links, {"::1": "WHY", "2001:db8::5": "WHY",
                                            "10.0.0.5": "WHY"})  # (never an IPv4 one)
    cause = "no address of this host's can send to the upstream: WHY; each connect fails " \
        "until one can (`connect-failed`, reason unreachable): "
    assert said == (
        f"7000=[::1]:7000 (0.0.0.0:7000 -> [::1]:7000): {cause}give 127.0.0.1",
        f"7001=[::1]:7001 (0.0.0.0:7001 -> [::1]:7001): {cause}give 127.0.0.1",
        f"7006=[2001:db8::5]:7006 (0.0.0.0:7006 -> [2001:db8::5]:7006): {cause}give the "
        "upstream's IPv4 address or a name that has one",
    )


@pytest.mark.parametrize(
    ("specs", "said"),
    [
        (["7000=10.0.0.5:7000"], "7000=10.0.0.5:7000 connects to its own listener "
         "(0.0.0.0:7000 -> 10.0.0.5:7000): each client would come back into the proxy, "
         "refused then (connect-failed, reason loop), unless this host gives the address's "
         "connections to another first (an IPVS service address, a DNAT rule); 10.0.0.5 is "
         "an address of this host"),
        (["[::]:7000=[::ffff:10.0.0.5]:7000"], "([::]:7000 -> [::ffff:10.0.0.5]:7000): each "
         "client would come back into the proxy, refused then (connect-failed, reason loop), "
         "unless this host gives the address's connections to another first (an IPVS "
         "service address, a DNAT rule); ::ffff:10.0.0.5 is an address of this host"),
        (["7000=10.0.0.5:7001", "7001=127.0.0.1:7000"], "links connect to one another's "
         "listeners in a ring: 7000=10.0.0.5:7001 (0.0.0.0:7000 -> 10.0.0.5:7001), "
         "7001=127.0.0.1:7000 (0.0.0.0:7001 -> 127.0.0.1:7000): each client would come "
         "back into the proxy, refused then (connect-failed, reason loop), unless this host "
         "gives the address's connections to another first (an IPVS service address, a "
         "DNAT rule); 127.0.0.1 is this host, 10.0.0.5 is an address of this host"),
        # Not reached: another address's listener, a chain that ends elsewhere, an address
        # not this host's.
        (["10.0.0.6:7000=10.0.0.5:7000"], None),
        (["7000=10.0.0.5:7001", "7001=10.0.0.7:7000"], None),
        (["7000=10.0.0.7:7000"], None),
    ],
)
def test_a_target_of_this_hosts_own_addresses_loops_as_localhost_does(
    specs: list[str], said: str | None
) -> None:
    """`0.0.0.0:6379=<the container's own IP>:6379` was taken without a word, and each
    client came back into the proxy, refused only a hop later. With the addresses the
    kernel said are this host's (here 10.0.0.5), the loop and ring checks say so, as a
    warning: the host may hand that address on first (IPVS), where it is no loop."""
    links = build_links(specs).links
    assert config.own_address_loop(links, frozenset()) == ()  # none of this host's
    warnings = config.own_address_loop(links, frozenset({"10.0.0.5"}))
    if said is None:
        assert warnings == ()
        return
    [warning] = warnings
    assert said in warning
    assert warning.endswith(
        " is an address of this host (in a container, the container itself): name the "
        "server's host"), warning


def test_every_loop_through_an_own_address_is_said_each_on_its_line() -> None:
    """Two links to their own listeners and two rings, through this host's 10.0.0.5: only
    the first was said, and the next came up only once that one was mended, a restart
    later. Each is said now, a line each (the log's `link-may-loop`, `links`'s warning),
    links to their own listeners first; a chain out to another host is not."""
    links = build_links(["7000=10.0.0.5:7000", "7001=10.0.0.5:7001",
                         "7002=10.0.0.5:7003", "7003=127.0.0.1:7002",
                         "7004=10.0.0.5:7005", "7005=127.0.0.1:7004",
                         "7006=10.0.0.5:7007", "7007=10.0.0.7:7006"]).links
    said = config.own_address_loop(links, frozenset({"10.0.0.5"}))
    starts = ("7000=10.0.0.5:7000 connects to its own listener ",
              "7001=10.0.0.5:7001 connects to its own listener ",
              "links connect to one another's listeners in a ring: 7002=10.0.0.5:7003 ",
              "links connect to one another's listeners in a ring: 7004=10.0.0.5:7005 ")
    assert len(said) == len(starts), said
    assert all(line.startswith(start) for line, start in zip(said, starts, strict=True)), said
    assert said[1] == (
        "7001=10.0.0.5:7001 connects to its own listener (0.0.0.0:7001 -> 10.0.0.5:7001): "
        "each client would come back into the proxy, refused then (connect-failed, reason "
        "loop), unless this host gives the address's connections to another first (an "
        "IPVS service address, a DNAT rule); 10.0.0.5 is an address of this host (in a "
        "container, the container itself): name the server's host")
    assert said[3].startswith(
        "links connect to one another's listeners in a ring: 7004=10.0.0.5:7005 "
        "(0.0.0.0:7004 -> 10.0.0.5:7005), 7005=127.0.0.1:7004 (0.0.0.0:7005 -> "
        "127.0.0.1:7004): each client"), said
    assert all("7006" not in line and "7007" not in line for line in said), said


def test_a_link_local_target_is_this_hosts_on_its_own_interface_only() -> None:
    """fe80::1 this host's on eth1 and a neighbour's on eth0: only the eth1 target loops
    (what read_links found, its zone kept, as own_address_candidates keys it). With the
    address alone, which zone's answer counted depended on the links' order, and the
    other's loop went unsaid, or a neighbour was called this host."""
    links = build_links(["[::]:7000=[fe80::1%eth0]:7000",
                         "[::]:7001=[fe80::1%eth1]:7001"]).links
    own = frozenset({"fe80::1%eth1"})
    assert set(config.own_address_candidates(links)) >= own
    [warning] = config.own_address_loop(links, own)
    assert warning.startswith("[::]:7001=[fe80::1%eth1]:7001 connects to its own "
                              "listener ([::]:7001 -> [fe80::1%eth1]:7001)"), warning
    assert "fe80::1%eth0" not in warning, warning
    assert warning.endswith("; fe80::1%eth1 is an address of this host (in a container, "
                            "the container itself): name the server's host"), warning


def test_spec_and_variable_on_one_port_with_different_targets() -> None:
    expected = re.escape("6379=10.0.0.1:6379 -> 10.0.0.1:6379 and REDIS")
    with pytest.raises(ConfigError, match=expected):
        build_links(["6379=10.0.0.1:6379"], {"REDIS_PORT_6379_TCP": "tcp://10.0.0.2:6379"})


def test_the_env_file_overrides_a_variable_the_environment_also_sets() -> None:
    """The env file is what a reload reads again: a link the environment gave (a
    --link) is rewired live by setting its variable in the file. The same value is one
    link, named once (it was `X,X`); another value is the file's, and the table says
    so; a value only the environment had wrong is no error once the file replaces it."""
    env_file = ("links.env", "REDIS_PORT_6379_TCP=tcp://10.0.0.6:6379\n")
    same = build_links([], {"REDIS_PORT_6379_TCP": "tcp://10.0.0.6:6379"}, env_file)
    assert [(x.names, str(x.target)) for x in same.links] == [
        (("REDIS_PORT_6379_TCP",), "10.0.0.6:6379")]
    assert same.overrides == ()
    for value in ("tcp://10.0.0.5:6379", "not a link"):
        table = build_links([], {"REDIS_PORT_6379_TCP": value, "HOME": "/root"}, env_file)
        assert [(x.names, str(x.target)) for x in table.links] == [
            (("REDIS_PORT_6379_TCP",), "10.0.0.6:6379")]
        assert table.overrides == (
            f"REDIS_PORT_6379_TCP is set in the environment and in env file 'links.env': the "
            f"file's 'tcp://10.0.0.6:6379' is used, not {value!r}",)
        assert table.warnings == ()


def test_a_link_keeps_its_name_whichever_source_sets_each_of_its_variables() -> None:
    """A link's variables are named in one order (by alias, then port) wherever each
    came from. The environment's were named before the file's, so pinning in the file a
    variable to the value the environment gives it (a model-based hunt of reloads)
    renamed the link, `C_PORT_6379_TCP,B_PORT_6379_TCP` becoming
    `B_PORT_6379_TCP,C_PORT_6379_TCP`: a reload that rewired nothing set its totals back
    to 0, and Prometheus saw a new series. SPECs still come first."""
    target = "tcp://10.0.0.6:6379"
    environ = {"C_PORT_6379_TCP": target, "A_PORT_6379_TCP": target}
    expected = ("A_PORT_6379_TCP", "B_PORT_6379_TCP", "C_PORT_6379_TCP")
    for text in ("B_PORT_6379_TCP=tcp://10.0.0.6:6379\n",
                 "C_PORT_6379_TCP=tcp://10.0.0.6:6379\nB_PORT_6379_TCP=tcp://10.0.0.6:6379\n",
                 "A_PORT_6379_TCP=tcp://10.0.0.6:6379\nB_PORT_6379_TCP=tcp://10.0.0.6:6379\n"):
        table = build_links([], environ, ("links.env", text))
        assert [link.names for link in table.links] == [expected], text
    table = build_links(["6379=10.0.0.6:6379"], environ, ("links.env", text))
    assert [link.names for link in table.links] == [("6379=10.0.0.6:6379", *expected)]


def test_env_file_syntax() -> None:
    text = (
        "# the redis link\n"
        "REDIS_PORT_6379_TCP=tcp://10.0.0.5:6379\n"
        "\n"
        "   INDENTED=kept literally = with equals\n"
        "QUOTED=\"tcp://not:unquoted\"\n"
        "FROM_HOST\n"
    )
    assert parse_env_file(text, "links.env") == {
        "REDIS_PORT_6379_TCP": "tcp://10.0.0.5:6379",
        "INDENTED": "kept literally = with equals",
        "QUOTED": '"tcp://not:unquoted"',
    }
    table = build_links([], None, ("links.env", text))
    assert [str(link.target) for link in table.links] == ["10.0.0.5:6379"]
    with pytest.raises(ConfigError, match=r"env file 'links.env', line 2: bad variable name"):
        parse_env_file("# ok\nBAD NAME=1\n", "links.env")
    # What Docker refuses too; with no '=' as well (Docker checks the name first): a line
    # of prose, or one half deleted, was skipped without a word, and a reload "succeeded".
    for refused in ("=1", "TAB\tNAME=1", "TRAILING =1", "garbage line without equals",
                    "A_PORT_1_TCP tcp://10.0.0.5:1", "FROM_HOST\t"):
        with pytest.raises(ConfigError, match=r"line 1: bad variable name"):
            parse_env_file(refused + "\n", "links.env")
    # What Docker takes, this takes: names that are no shell's (a file shared with the
    # container's own --env-file), never links, so ignored.
    shared = "2FA_SECRET=x\nmy.setting-1=y\nÄPFEL=z\nDB_PORT_5432_TCP=tcp://10.0.0.5:5432\n"
    assert parse_env_file(shared, "links.env")["2FA_SECRET"] == "x"
    table = build_links([], None, ("links.env", shared))
    assert [link.name for link in table.links] == ["DB_PORT_5432_TCP"]
    with pytest.raises(ConfigError, match=r"variable A_PORT_1_TCP \('links.env'\): expected tcp://"):
        build_links([], None, ("links.env", "A_PORT_1_TCP=udp://1.2.3.4:1\n"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (Options(max_children=0), "--max-children 0: must be at least 1"),
        (Options(relay="zero-copy"), "--relay 'zero-copy'"),
        (Options(connect_timeout=0), "--connect-timeout 0"),
        (Options(grace=-1), "--grace -1"),
        (Options(idle_timeout=float("nan")), "--idle-timeout nan"),
        (Options(connect_retries=-1), "--connect-retries -1"),
        (Options(connect_retries=1001), "--connect-retries 1001: at most 1000 (about half an "
         "hour of backoff)"),
        (Options(allow=("10.0.0.0/33",)), "--allow '10.0.0.0/33'"),
        (Options(allow=("bogus",)), "--allow 'bogus'"),
        (Options(allow=("",)), "--allow '': empty: name a network"),
        (Options(allow=("10.0.0.0/8,192.168.0.0/16",)), "--allow '10.0.0.0/8,192.168.0.0/16': "
         "not an IPv4 or IPv6 CIDR: networks are separated by spaces in FORKPROXY_ALLOW"),
        # A zone was dropped by ipaddress: fe80::/64 let in on every interface (and a zone
        # of no interface taken), while the flag read as one interface's clients only.
        (Options(allow=("fe80::%eth0/64",)), "--allow 'fe80::%eth0/64': a network takes no "
         "IPv6 zone (clients are allowed by address, whatever the interface): drop the '%eth0'"),
        (Options(allow=("fe80::1%nosuch",)), "--allow 'fe80::1%nosuch': a network takes no "
         "IPv6 zone"),
        (Options(metrics="localhost:9100"), "is not an IP address"),
        (Options(log_format="xml"), "--log-format 'xml'"),
        (Options(idle_timeout=2_000_001), "at most 2,000,000 seconds (23 days); 'off' means none"),
        (Options(grace=1e10), "--grace 1e+10: at most 2,000,000 seconds (23 days)"),
    ],
)
def test_bad_options(options: Options, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_options(options)
    assert message in str(caught.value)


def test_connect_retries_up_to_the_documented_bound_are_accepted() -> None:
    assert check_options(Options(connect_retries=1000)).connect_retries == 1000


@pytest.mark.parametrize(
    ("text", "value"),
    [("64", 64), ("0000000064", 64), ("-1", -1), ("999999999", 999999999),
     ("0" * 5000 + "7", 7), ("-" + "0" * 5000 + "7", -7)],  # past int()'s 4,300 digits
)
def test_counts_parse(text: str, value: int) -> None:
    assert parse_count(text, "--max-children") == value  # ranges are checked later


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1e3", "--max-children '1e3': not a whole number"),
        ("\u0663", "not a whole number"),  # ARABIC-INDIC DIGIT THREE: isdigit(), not a count
        ("--1", "not a whole number"),
        ("", "not a whole number"),
        ("1000000000", "--max-children '1000000000': too large"),
        ("99999999999999999999", "too large"),
    ],
)
def test_bad_counts(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_count(text, "--max-children")


def test_sources_survive_the_trip_to_the_supervisor() -> None:
    sources = Sources(("1=a:2",), True, "/x.env",
                      Options(allow=("10.0.0.0/8",), grace=3.0, keepalive=30), bind="::1",
                      aliases=("REDIS", "MY_DB"))
    assert sources_from_json(sources_to_json(sources)) == sources


def test_unknown_variables_survive_the_trip_to_the_supervisor_as_json() -> None:
    """The CLI's `unknown-variable` warnings reach the supervisor through JSON, which has
    no tuples: they come back as the pairs they left as."""
    options = Options(unknown_variables=(("FORKPROXY_ALLOWED", "did you mean ..."),),
                      option_variables=(("FORKPROXY_ALLOW", "--allow"),))
    sources = Sources(("1=a:2",), options=options)
    assert sources_from_json(json.loads(json.dumps(sources_to_json(sources)))) == sources


def test_the_option_variables_an_env_file_holds_are_told_never_their_values() -> None:
    """The file sets links only: FORKPROXY_ALLOW in it set nothing, without a word. Each
    option variable in it (any case) is said, in name order, with where it must go, and
    so is a FORKPROXY_ name no option reads (test below); the links of an alias FORKPROXY
    (a chained ambassador) and other variables are not."""
    text = ("FORKPROXY_PORT_7000_TCP=tcp://10.0.0.5:7000\nforkproxy_bind=10.9.9.9\n"
            "FORKPROXY_ALLOW=10.0.0.0/8\nFORKPROXY_ALLOWED=x\nOTHER=1\nFORKPROXY_GRACE\n")
    variables = (("FORKPROXY_ALLOW", "--allow"), ("FORKPROXY_BIND", "--bind"),
                 ("FORKPROXY_GRACE", "--grace"))
    table = build_links((), env_file=("/e.env", text), option_variables=variables)
    assert [link.name for link in table.links] == ["FORKPROXY_PORT_7000_TCP"]
    assert table.file_options == (
        ("FORKPROXY_ALLOW", "an option variable in env file '/e.env', which sets links only: "
         "ignored; set FORKPROXY_ALLOW in forkproxy's environment, or give --allow"),
        ("FORKPROXY_ALLOWED", "no option reads it, and env file '/e.env' sets links only: "
         "ignored; did you mean FORKPROXY_ALLOW (--allow)?"),
        ("forkproxy_bind", "an option variable in env file '/e.env', which sets links only: "
         "ignored; set FORKPROXY_BIND (in upper case) in forkproxy's environment, or give "
         "--bind"),
    )
    assert "10." not in repr(table.file_options)
    # The environment's option variables are options, never the file's warnings.
    environ = {"FORKPROXY_ALLOW": "10.0.0.0/8", "A_PORT_1_TCP": "tcp://10.0.0.5:1"}
    assert build_links((), environ, option_variables=variables).file_options == ()


def test_an_unknown_forkproxy_name_in_the_env_file_is_told_as_in_the_environment() -> None:
    """FORKPROXY_MAX_CHILDRN=10 in the env file (a typo) was silent, where in the
    environment it is an `unknown-variable` warning: said now, in the same words, with the
    option meant; what the environment's check takes for no mistake (the project's own,
    the variables of a linked alias FORKPROXY) is none here either. Values never shown."""
    text = ("A_PORT_7000_TCP=tcp://10.0.0.5:7000\nFORKPROXY_MAX_CHILDRN=10-s3cret\n"
            "FORKPROXY_NOSUCHTHING=1\nFORKPROXY_BENCH_VENV=/v\nFORKPROXY_PORT=tcp://x:1\n"
            "FORKPROXY_NAME=/a/forkproxy\nFORKPROXY_ENV_X=1\nFORKPROXY_SERVICE_HOST=10.0.0.9\n"
            "FORKPROXY_GRACE=5\n")
    variables = (("FORKPROXY_MAX_CHILDREN", "--max-children"), ("FORKPROXY_GRACE", "--grace"))
    table = build_links((), env_file=("/e.env", text), option_variables=variables)
    assert table.file_options == (
        ("FORKPROXY_GRACE", "an option variable in env file '/e.env', which sets links only: "
         "ignored; set FORKPROXY_GRACE in forkproxy's environment, or give --grace"),
        ("FORKPROXY_MAX_CHILDRN", "no option reads it, and env file '/e.env' sets links only: "
         "ignored; did you mean FORKPROXY_MAX_CHILDREN (--max-children)?"),
        ("FORKPROXY_NOSUCHTHING", "no option reads it, and env file '/e.env' sets links only: "
         "ignored; each option's variable is in README's table of serve's options"),
    )
    assert "s3cret" not in repr(table.file_options)
    # The environment's check, on the same names, finds the same ones unknown.
    environ = dict(line.split("=", 1) for line in text.splitlines())
    assert [name for name, _ in unknown_variables(environ, dict(variables), ())] == [
        "FORKPROXY_MAX_CHILDRN", "FORKPROXY_NOSUCHTHING"]
    # No option variables given (nothing known): nothing judged unknown.
    assert build_links((), env_file=("/e.env", text)).file_options == ()
    # The variable serve sets for the metrics process, spelt out here: no mistake either.
    assert unknown_variables({IMPORT_PATH_VARIABLE: "/x"}, dict(variables), ()) == ()


def test_a_file_of_unknown_names_costs_no_spelling_search_past_the_first_few() -> None:
    """Each unknown FORKPROXY_ name was compared with every option's spelling (~0.25 ms a
    name): an env file of them (1 MiB: ~40,000) held the supervisor ~10 s at each reload,
    accepting nobody. The first SPELLED_AT_MOST, in name order, still get their `did you
    mean`; every one is still warned of, in the env file and the environment alike."""
    variables = (("FORKPROXY_MAX_CHILDREN", "--max-children"), ("FORKPROXY_GRACE", "--grace"))
    # 25 names, each a letter away from FORKPROXY_MAX_CHILDREN
    typos = [f"FORKPROXY_MAX_CHILDRE{letter}" for letter in "ABCDEFGHIJKLMOPQRSTUVWXYZ"]
    link = "A_PORT_7000_TCP=tcp://10.0.0.5:7000\n"
    text = link + "".join(f"{name}=1\n" for name in typos)
    table = build_links((), env_file=("/e.env", text), option_variables=variables)
    assert [name for name, _ in table.file_options] == typos
    meant = [name for name, detail in table.file_options
             if detail.endswith("did you mean FORKPROXY_MAX_CHILDREN (--max-children)?")]
    assert meant == typos[:config.SPELLED_AT_MOST]
    environ = dict.fromkeys(typos, "1")
    found = unknown_variables(environ, dict(variables), ())
    assert [name for name, _ in found] == typos
    assert [name for name, detail in found if "did you mean" in detail] == meant
    # What it cost: a file's worth of 14-letter names, in CPU time (the machine may be
    # busy). Before, ~10 s here.
    names = [f"FORKPROXY_{index:014X}".replace("0", "Q") for index in range(38_000)]
    text = link + "".join(f"{name}=1\n" for name in names)
    started = time.process_time()
    table = build_links((), env_file=("/e.env", text), option_variables=variables)
    assert len(table.file_options) == len(names)
    assert time.process_time() - started < 2.5
    # And names of a portless link's shape (FORKPROXY_<ALIAS>_NAME), each of which is
    # also checked for being an option's typo: the same budget bounds them, against as
    # many option variables as serve has (~30).
    many = variables + tuple((f"FORKPROXY_OPTION_{word}_{index}", f"--option-{index}")
                             for index, word in enumerate(["TIMEOUT", "LIMIT", "FILE"] * 10))
    text = link + "".join(f"{name}_NAME=1\n" for name in names)
    started = time.process_time()
    build_links((), env_file=("/e.env", text), option_variables=many)
    assert time.process_time() - started < 2.5


def test_a_portless_linked_containers_environment_leaves_the_spelling_budget_for_typos() -> None:
    """A container linked as forkproxy-db with no port gives FORKPROXY_DB_NAME and one
    FORKPROXY_DB_ENV_ name per variable of its environment (often 16 and more): each spent
    the spelling budget, and a typo after them in name order (FORKPROXY_ENV_FIEL) was
    taken for a portless link's variable, unwarned. Its _NAME is looked at once for all."""
    variables = {"FORKPROXY_ENV_FILE": "--env-file", "FORKPROXY_GRACE": "--grace"}
    container = {f"FORKPROXY_DB_ENV_VAR{index:02d}": "x"
                 for index in range(config.SPELLED_AT_MOST + 4)}
    environ = {"FORKPROXY_DB_NAME": "/app/forkproxy-db", **container,
               "FORKPROXY_ENV_FIEL": "/e.env"}
    assert unknown_variables(environ, variables, ()) == ((
        "FORKPROXY_ENV_FIEL",
        "no option reads it: ignored; did you mean FORKPROXY_ENV_FILE (--env-file)?"),)
    # The same names in the env file alike (FORKPROXY_ENV_FILE named too: an option's).
    text = "A_PORT_7000_TCP=tcp://10.0.0.5:7000\n" + "".join(
        f"{name}={value}\n" for name, value in environ.items())
    table = build_links((), env_file=("/e.env", text),
                        option_variables=tuple(variables.items()))
    assert [name for name, _ in table.file_options] == ["FORKPROXY_ENV_FIEL"]


def test_a_linked_containers_name_variable_is_no_typo_of_the_option_its_alias_spells() -> None:
    """A container linked as forkproxy-metrics, with a port, gives FORKPROXY_METRICS_NAME
    beside its port variables: its link's own, as the port variables are, not a typo of
    FORKPROXY_METRICS (--metrics) to be warned of. A _NAME no link gives (a non-ASCII
    alias) is still warned of."""
    variables = {"FORKPROXY_METRICS": "--metrics", "FORKPROXY_GRACE": "--grace"}
    environ = {"FORKPROXY_METRICS_PORT": "tcp://172.17.0.6:9000",
               "FORKPROXY_METRICS_PORT_9000_TCP": "tcp://172.17.0.6:9000",
               "FORKPROXY_METRICS_PORT_9000_TCP_ADDR": "172.17.0.6",
               "FORKPROXY_METRICS_PORT_9000_TCP_PORT": "9000",
               "FORKPROXY_METRICS_PORT_9000_TCP_PROTO": "tcp",
               "FORKPROXY_METRICS_NAME": "/app/forkproxy-metrics",
               "FORKPROXY_METRICS_ENV_LEVEL": "info"}
    assert unknown_variables(environ, variables, ()) == ()
    # A name no Docker link gives (its alias upper-cased ASCII, `-` made `_`): warned.
    assert [name for name, _ in unknown_variables(
        {"FORKPROXY_D\u00c9BUG_NAME": "x"}, variables, ())] == ["FORKPROXY_D\u00c9BUG_NAME"]


def test_a_typo_of_an_option_variable_is_warned_beside_a_portless_link_named_forkproxy() -> None:
    """A container linked as `forkproxy` (no alias after it) with no port gives
    FORKPROXY_NAME: its presence makes no FORKPROXY_ENV_ name a portless link's own, and
    FORKPROXY_ENV_FIEL is still the typo of FORKPROXY_ENV_FILE it looks like."""
    variables = {"FORKPROXY_ENV_FILE": "--env-file", "FORKPROXY_GRACE": "--grace"}
    environ = {"FORKPROXY_NAME": "/app/forkproxy", "FORKPROXY_ENV_FIEL": "/e.env"}
    assert unknown_variables(environ, variables, ()) == ((
        "FORKPROXY_ENV_FIEL",
        "no option reads it: ignored; did you mean FORKPROXY_ENV_FILE (--env-file)?"),)


def test_a_name_that_begins_several_option_variables_suggests_none_of_them() -> None:
    """FORKPROXY_CONNECT begins FORKPROXY_CONNECT_TIMEOUT and FORKPROXY_CONNECT_RETRIES:
    a word more or less names the option only when one option has it; here neither is
    near enough in spelling either, so the warning names where the variables are listed,
    not the first of the two."""
    variables = {"FORKPROXY_CONNECT_TIMEOUT": "--connect-timeout",
                 "FORKPROXY_CONNECT_RETRIES": "--connect-retries", "FORKPROXY_GRACE": "--grace"}
    assert unknown_variables({"FORKPROXY_CONNECT": "5"}, variables, ()) == ((
        "FORKPROXY_CONNECT",
        "no option reads it: ignored; each option's variable is in README's table of serve's "
        "options"),)


def test_the_nearest_of_equally_near_names_is_the_first() -> None:
    """As difflib's get_close_matches (n=1) would: the first of those alike, in the
    candidates' order, not the last."""
    assert _nearest("ABCDX", ["ABCDY", "ABCDZ"]) == "ABCDY"
    assert _nearest("ABCDX", ["ABCDZ", "ABCDY"]) == "ABCDZ"


@pytest.mark.parametrize(
    "typed",
    ["MAXCHILDREN", "MAX_CHILDRN", "MAX_CHILD", "GRAEC", "LOGFORMAT", "PIDFILE", "KEEP_ALIVE",
     "USERTIMEOUT", "ALOW", "BIN", "METRIC", "CONECT_TIMEOUT", "RESOLVE", "TAKE_OVER", "X",
     "STATUS", "TIMEOUT", "CONNECT", "", "A" * 5000],
)
def test_the_nearest_option_name_is_difflibs_for_these_typos(typed: str) -> None:
    """config._nearest (the supervisor does not import difflib) suggests what difflib's
    get_close_matches did, when the CLI used it for the environment's unknown names, for
    these typos (not for every input: its ratio is a subsequence's, not difflib's blocks)."""
    import difflib

    names = sorted(["RELAY", "CONNECT_TIMEOUT", "CONNECT_RETRIES", "GRACE", "IDLE_TIMEOUT",
                    "HALFCLOSE_TIMEOUT", "KEEPALIVE", "USER_TIMEOUT", "RESOLVE_EVERY",
                    "MAX_CHILDREN", "ALLOW", "STATUS_SOCKET", "METRICS", "PID_FILE",
                    "LOG_FORMAT", "FROM_ENV", "ENV_FILE", "ALIAS", "BIND"])
    expected = difflib.get_close_matches(typed, names, n=1, cutoff=0.75)
    assert _nearest(typed, names) == (expected[0] if expected else None)


@pytest.mark.parametrize(
    ("text", "bind"),
    [("127.0.0.1", "127.0.0.1"), ("::", "::"), ("[::]", "::"), ("fe80::1%eth0", "fe80::1%eth0")],
)
def test_bind_moves_every_listener_that_names_no_address(text: str, bind: str) -> None:
    """A SPEC without a BIND_ADDR listened on 0.0.0.0 whatever --bind said: a user who
    restricted the listeners with it was exposed on every interface, without a word."""
    env = {"REDIS_PORT_6379_TCP": "tcp://10.0.0.5:6379"}
    table = build_links(["127.0.0.2:80=10.0.0.6:80", "82=10.0.0.6:82"], env,
                        ("f.env", "W_PORT_81_TCP=tcp://a:1\n"), parse_link_bind(text))
    assert sorted((link.bind, link.port) for link in table.links) == sorted(
        [("127.0.0.2", 80), (bind, 82), (bind, 6379), (bind, 81)]  # a SPEC's own is kept
    )


@pytest.mark.parametrize("text", ["", "localhost", "[::1", "10.0.0.0/8", "fe80::1", "127.0.0.1:80"])
def test_a_bind_that_is_not_one_address_is_refused_by_flag(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^--bind "):
        parse_link_bind(text)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        # `--allow "$NETS"`: a list as FORKPROXY_ALLOW takes it, in one flag's value.
        (Options(allow=("10.0.0.0/8 192.168.0.0/16",)), "--allow '10.0.0.0/8 192.168.0.0/16': "
         "not an IPv4 or IPv6 CIDR: 2 networks in one --allow: give each its own --allow "
         "(FORKPROXY_ALLOW takes them separated by spaces)"),
        # Two addresses in one --metrics: IPv6 brackets were blamed, the rest read as the host.
        (Options(metrics="127.0.0.1:9100 127.0.0.1:9101"), "--metrics '127.0.0.1:9100 "
         "127.0.0.1:9101': 2 addresses in one --metrics: forkproxy serves metrics on one "
         "address (--metrics 0.0.0.0:PORT for every IPv4 address, [::]:PORT for every IPv6 "
         "and IPv4 one)"),
        (Options(metrics="0.0.0.0:9100,[::]:9100"), "--metrics '0.0.0.0:9100,[::]:9100': 2 "
         "addresses in one --metrics: forkproxy serves metrics on one address (--metrics "
         "0.0.0.0:PORT for every IPv4 address, [::]:PORT for every IPv6 and IPv4 one)"),
        # One address that is wrong keeps its own error.
        (Options(metrics="127.0.0.1:x"), "--metrics '127.0.0.1:x': port 'x' is not a number"),
        (Options(allow=("10.0.0.0/8 ",)), "--allow '10.0.0.0/8 ': not an IPv4 or IPv6 CIDR"),
    ],
)
def test_a_list_in_one_value_says_how_to_give_several(options: Options, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        check_options(options)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("127.0.0.1 ::1", "--bind '127.0.0.1 ::1': 2 addresses in one --bind: links listen on "
         "one default address: to listen on more, give SPECs with their own "
         "(127.0.0.1:6379=HOST:PORT [::1]:6379=HOST:PORT), or --bind :: for every IPv6 and "
         "IPv4 address"),
        ("127.0.0.1,10.0.0.1", "--bind '127.0.0.1,10.0.0.1': 2 addresses in one --bind: links "
         "listen on one default address: to listen on more, give SPECs with their own "
         "(127.0.0.1:6379=HOST:PORT [::1]:6379=HOST:PORT), or --bind :: for every IPv6 and "
         "IPv4 address"),
        ("nowhere", "--bind 'nowhere': bind address 'nowhere' is not an IP address"),
    ],
)
def test_a_list_in_one_bind_says_how_to_listen_on_several(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_link_bind(text)
    assert str(caught.value) == message


@pytest.mark.parametrize("inside", ["127.0.0.1", "0.0.0.0", "localhost"])
def test_brackets_around_a_bind_hold_ipv6_only_as_in_a_spec(inside: str) -> None:
    """`--bind '[127.0.0.1]'` was taken while the SPEC `[127.0.0.1]:1=...` was refused:
    one rule for brackets now, in the SPEC's words."""
    text = f"[{inside}]"
    said = f"{inside!r} in brackets is not an IPv6 address"
    with pytest.raises(ConfigError, match=f"^{re.escape(f'--bind {text!r}: {said}')}$"):
        parse_link_bind(text)
    with pytest.raises(ConfigError, match=re.escape(said)):
        build_links([f"[{inside}]:1=127.0.0.1:2"])
    assert parse_link_bind("[::1]") == "::1"  # IPv6 in brackets, as before


@given(st.text(max_size=80))
def test_any_spec_parses_or_raises_config_error(text: str) -> None:
    try:
        link = parse_spec(text)
    except ConfigError as exc:
        assert "\n" not in str(exc)
        return
    assert 0 <= link.port <= 65535 and 1 <= link.target.port <= 65535
    assert link.target.host and all(c.isascii() and c.isprintable() for c in link.target.host)
    assert not set(link.target.host) & set("$`;|&<>(){} '\"\\")


@given(st.text(max_size=40), st.text(max_size=60))
def test_any_link_variable_parses_or_raises_config_error(suffix: str, value: str) -> None:
    name = f"X_PORT_{suffix}_TCP"
    try:
        links, _ = links_from_env({name: value})
    except ConfigError as exc:
        assert name in str(exc)
        return
    for link in links:
        assert 1 <= link.port <= 65535 and 1 <= link.target.port <= 65535
        assert not set(link.target.host) & set("$`;|&<>(){} '\"\\")


@given(st.text(max_size=200))
def test_any_env_file_parses_or_raises_config_error(text: str) -> None:
    try:
        table = build_links([], None, ("f.env", text))
    except ConfigError as exc:
        assert str(exc)
        return
    assert table.links


@pytest.mark.parametrize(
    ("spec", "port", "target_port"),
    [
        ("24000=127.0.0.1:0080", 24000, 80),
        ("24000=127.0.0.1:000080", 24000, 80),  # was "out of range (1-65535)"
        ("024000=127.0.0.1:" + "0" * 100 + "80", 24000, 80),
        ("00000=127.0.0.1:065535", 0, 65535),
    ],
)
def test_ports_with_leading_zeros_are_their_value(spec: str, port: int, target_port: int) -> None:
    link = parse_spec(spec)
    assert (link.port, link.target.port) == (port, target_port)


@pytest.mark.parametrize(
    ("specs", "env", "overlap"),
    [
        (["127.0.0.1:6379=10.0.0.5:1"], {"R_PORT_6379_TCP": "tcp://10.0.0.5:1"}, True),
        (["[::]:6379=10.0.0.5:1", "127.0.0.1:6379=10.0.0.5:1"], {}, True),
        (["[::]:6379=10.0.0.5:1", "[::1]:6379=10.0.0.5:1"], {}, True),
        (["[::]:6379=10.0.0.5:1", "6379=10.0.0.5:1"], {}, True),
        (["127.0.0.1:6379=10.0.0.5:1", "127.0.0.2:6379=10.0.0.6:1"], {}, False),
        (["[::1]:6379=10.0.0.5:1", "6379=10.0.0.5:1"], {}, False),  # v6-only and v4
        (["127.0.0.1:0=10.0.0.5:1", "0=10.0.0.5:1"], {}, False),  # port 0: each its own
        # An IPv4-mapped address binds IPv4: "address already in use" at start.
        (["127.0.0.1:6379=10.0.0.5:1", "[::ffff:127.0.0.1]:6379=10.0.0.5:1"], {}, True),
        (["6379=10.0.0.5:1", "[::ffff:127.0.0.1]:6379=10.0.0.5:1"], {}, True),
        (["127.0.0.1:6379=10.0.0.5:1", "[::ffff:0.0.0.0]:6379=10.0.0.5:1"], {}, True),
        (["127.0.0.2:6379=10.0.0.5:1", "[::ffff:127.0.0.1]:6379=10.0.0.5:1"], {}, False),
    ],
)
def test_listeners_whose_addresses_overlap_are_refused_by_name(
    specs: list[str], env: dict[str, str], overlap: bool,
) -> None:
    """`links` (the dry run) took them, and `serve` then failed with "address already in
    use", as if another program held the port."""
    if not overlap:
        assert len(build_links(specs, env).links) == len(specs) + len(env)
        return
    with pytest.raises(ConfigError, match=r"port 6379 is bound twice: .* overlap"):
        build_links(specs, env)


def _merge_links_pairwise(links: list[Link]) -> tuple[Link, ...]:
    """merge_links as it was, comparing every pair of links (quadratic: 7 s for 20,000
    links): the oracle for the linear one."""
    by_key: dict[tuple[str, int, tuple[str, ...]], Link] = {}
    for link in links:
        known = by_key.get(link.key)
        if known is None:
            by_key[link.key] = link
        elif known.target.same_as(link.target):
            names = known.names + tuple(name for name in link.names if name not in known.names)
            by_key[link.key] = Link(known.bind, known.port, known.target, names)
        else:
            raise ConfigError(
                f"port {link.port} is linked twice to different targets: "
                f"{known.name} -> {known.target} and {link.name} -> {link.target}"
            )
    merged = tuple(by_key.values())
    for index, link in enumerate(merged):
        for other in merged[index + 1 :]:
            if link.port and link.port == other.port and overlap(link.bind, other.bind):
                raise ConfigError(
                    f"port {link.port} is bound twice: {link.name} on {link.bind} and "
                    f"{other.name} on {other.bind} overlap"
                )
    return merged


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        # The first link that overlaps one after it, with the first of those: A and D,
        # though B and C come before D.
        (["127.0.0.1:1=10.0.0.5:1", "127.0.0.2:2=10.0.0.5:1", "0.0.0.0:2=10.0.0.5:1",
          "1=10.0.0.5:1"],
         "port 1 is bound twice: 127.0.0.1:1=10.0.0.5:1 on 127.0.0.1 and 1=10.0.0.5:1 on "
         "0.0.0.0 overlap"),
        # IPv6-only and IPv4 do not overlap; 0.0.0.0 and an IPv4 address do.
        (["[::1]:1=10.0.0.5:1", "1=10.0.0.5:1", "127.0.0.1:1=10.0.0.5:1"],
         "port 1 is bound twice: 1=10.0.0.5:1 on 0.0.0.0 and 127.0.0.1:1=10.0.0.5:1 on "
         "127.0.0.1 overlap"),
        (["[::1]:1=10.0.0.5:1", "2=10.0.0.5:1", "[::]:1=10.0.0.5:1"],
         "port 1 is bound twice: [::1]:1=10.0.0.5:1 on ::1 and [::]:1=10.0.0.5:1 on :: overlap"),
        # Named as given, mapped or not.
        (["[::ffff:127.0.0.1]:1=10.0.0.5:1", "127.0.0.1:1=10.0.0.5:1"],
         "port 1 is bound twice: [::ffff:127.0.0.1]:1=10.0.0.5:1 on ::ffff:127.0.0.1 and "
         "127.0.0.1:1=10.0.0.5:1 on 127.0.0.1 overlap"),
        (["1=10.0.0.5:1", "1=10.0.0.6:1"],
         "port 1 is linked twice to different targets: 1=10.0.0.5:1 -> 10.0.0.5:1 and "
         "1=10.0.0.6:1 -> 10.0.0.6:1"),
    ],
)
def test_a_clash_names_the_first_two_links_that_clash(specs: list[str], message: str) -> None:
    links = [parse_spec(spec) for spec in specs]
    with pytest.raises(ConfigError) as caught:
        merge_links(links)
    assert str(caught.value) == message
    with pytest.raises(ConfigError) as caught:
        _merge_links_pairwise(links)
    assert str(caught.value) == message


@pytest.mark.parametrize(("last", "clash", "v6_first"), [
    (None, None, False),
    ("0.0.0.0", "L0 on 127.0.0.1 and L2000 on 0.0.0.0", False),
    # Late in the order: the pairwise loop compared ~2 million pairs before it.
    ("::ffff:127.0.3.250", "L999 on 127.0.3.250 and L2000 on ::ffff:127.0.3.250", False),
    # An IPv6 address does not overlap 0.0.0.0: the IPv6 links before it scan nothing.
    ("0.0.0.0", "L1000 on 127.0.0.1 and L2000 on 0.0.0.0", True),
])
def test_the_overlap_check_compares_each_link_with_few_others(
    monkeypatch: pytest.MonkeyPatch, last: str | None, clash: str | None, v6_first: bool,
) -> None:
    """It compared every pair: 7 s for the ~20,000 links of a 1 MiB env file, during which
    a reloading supervisor accepted no client. Counted, not timed: 2 links compared per
    link at most."""
    binds = [f"127.0.{n // 250}.{n % 250 + 1}" for n in range(1000)]
    v6 = [f"fd00::{n + 1:x}" for n in range(1000)]
    binds = v6 + binds if v6_first else binds + v6
    binds += [last] if last else []
    links = [Link(bind, 6379, Endpoint("10.0.0.5", 1), (f"L{n}",)) for n, bind in enumerate(binds)]
    calls = 0

    def counted(one: str, other: str) -> bool:
        nonlocal calls
        calls += 1
        assert calls <= 2 * len(links), "every pair compared"
        return overlap(one, other)

    monkeypatch.setattr(config, "_overlap", counted)
    if clash is None:
        assert merge_links(links) == tuple(links)
        return
    with pytest.raises(ConfigError) as caught:
        merge_links(links)
    assert str(caught.value) == f"port 6379 is bound twice: {clash} overlap"


_BINDS = ["0.0.0.0", "::", "127.0.0.1", "127.0.0.2", "::1", "fd00::1", "::ffff:127.0.0.1",
          "::ffff:0.0.0.0", "fe80::1%eth0"]


@pytest.mark.parametrize("second", ["1=10.0.0.6:1", "127.0.0.1:1=10.0.0.5:1"])
def test_a_clash_of_long_names_is_one_short_line(second: str) -> None:
    """A link's name went into the clash's line whole: 3,000 characters of a SPEC, or
    every alias of a port (a file may hold thousands). Each is shortened as input is."""
    long_spec = "0" * 3000 + "1=10.0.0.5:1"
    aliases = [Link("0.0.0.0", 1, Endpoint("10.0.0.5", 1), (f"A{i}_PORT_1_TCP",))
               for i in range(500)]
    for links in ([parse_spec(long_spec)], aliases):
        with pytest.raises(ConfigError) as caught:
            merge_links([*links, parse_spec(second)])
        assert len(str(caught.value)) < 300, str(caught.value)
        assert "..." in str(caught.value)


@settings(max_examples=1000)
@given(st.lists(st.tuples(st.sampled_from(_BINDS), st.integers(0, 3), st.integers(1, 2),
                          st.integers(0, 12)), max_size=12))
def test_merge_links_is_the_pairwise_check(
    drawn: list[tuple[str, int, int, int]],
) -> None:
    """The check compared every pair of links; now it groups them by port and address:
    the same links merged, or the same error naming the same two links."""
    links = [Link(bind, port, Endpoint("10.0.0.5", target), (f"L{name}",))
             for bind, port, target, name in drawn]
    try:
        expected: tuple[Link, ...] | str = _merge_links_pairwise(links)
    except ConfigError as exc:
        expected = str(exc)
    try:
        got: tuple[Link, ...] | str = merge_links(links)
    except ConfigError as exc:
        got = str(exc)
    assert got == expected


@pytest.mark.parametrize(
    ("metrics", "specs", "overlap"),
    [
        ("127.0.0.1:6379", ["127.0.0.1:6379=10.0.0.5:1"], True),
        (":6379", ["127.0.0.1:6379=10.0.0.5:1"], True),  # empty HOST: 0.0.0.0
        ("[::]:6379", ["127.0.0.2:6379=10.0.0.5:1"], True),
        ("127.0.0.1:6379", ["[::ffff:127.0.0.1]:6379=10.0.0.5:1"], True),
        ("127.0.0.1:6379", ["127.0.0.2:6379=10.0.0.5:1"], False),
        ("127.0.0.1:6379", ["[::1]:6379=10.0.0.5:1"], False),
        ("127.0.0.1:6380", ["127.0.0.1:6379=10.0.0.5:1"], False),
        ("127.0.0.1:0", ["127.0.0.1:0=10.0.0.5:1"], False),  # port 0: each its own
    ],
)
def test_metrics_on_a_listeners_port_is_refused_by_name(
    metrics: str, specs: list[str], overlap: bool,
) -> None:
    """serve said "--metrics ...: cannot listen on ...: address already in use", as if
    another program held the port."""
    links = build_links(specs).links
    if not overlap:
        check_metrics_port(metrics, links)
        return
    with pytest.raises(ConfigError, match=(
        rf"^--metrics '{re.escape(metrics)}': port 6379 is bound twice: the metrics endpoint "
        rf"on .* and {re.escape(specs[0])} on .* overlap$"
    )):
        check_metrics_port(metrics, links)


# Global, unique local, loopback, unspecified and IPv4-mapped: no address but fe80::/10
# takes a zone (as the fuzzing that found `[::1%lo]` tried them, with names and an index).
@pytest.mark.parametrize(("host", "kind"), [
    ("224.0.0.1", "a multicast address"),
    ("239.255.255.250", "a multicast address"),
    ("[ff02::1]", "a multicast address"),
    ("[ff02::1%eth0]", "a multicast address"),  # not "drop the zone": no zone would help
    ("[ff0e::5]", "a multicast address"),
    ("[::ffff:224.0.0.1]", "a multicast address"),
    ("255.255.255.255", "the broadcast address"),
    ("[::ffff:255.255.255.255]", "the broadcast address"),
])
def test_a_target_no_tcp_connection_can_reach_is_refused(host: str, kind: str) -> None:
    """A multicast or the broadcast address as the target was taken, and every
    connection failed ("Network is unreachable": Linux sends nothing). Said at once now,
    by SPEC and by link variable alike."""
    shown = repr(host.strip("[]"))
    said = f"{shown} is {kind}: TCP cannot connect to it"
    spec = f"1={host}:80"
    with pytest.raises(ConfigError, match=f"^{re.escape(f'SPEC {spec!r}: {said}')}$"):
        build_links([spec])
    with pytest.raises(ConfigError, match=f"^{re.escape(f'variable A_PORT_1_TCP: {said}')}$"):
        build_links([], {"A_PORT_1_TCP": f"tcp://{host}:80"})


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]", "[::ffff:0.0.0.0]", "127.255.255.254",
                                  "240.0.0.1", "[2001:db8::1]"])
def test_targets_linux_can_connect_to_are_taken(host: str) -> None:
    """The unspecified addresses stay targets: Linux connects 0.0.0.0 (::) to this host."""
    assert build_links([f"1={host}:80"]).links[0].target.port == 80


@pytest.mark.parametrize(("address", "kind"), [
    ("224.0.0.1", "a multicast address"),
    ("ff02::1", "a multicast address"),
    ("255.255.255.255", "the broadcast address"),
    ("::ffff:255.255.255.255", "the broadcast address"),
])
def test_a_listening_address_no_client_can_reach_is_refused(address: str, kind: str) -> None:
    """Linux binds a listener to 224.0.0.1 or 255.255.255.255 and it starts, but takes no
    SYN sent there: --bind, a SPEC's BIND_ADDR and --metrics are refused as targets are."""
    said = f"{address!r} is {kind}: no TCP client can connect to a listener there"
    bracketed = f"[{address}]" if ":" in address else address
    with pytest.raises(ConfigError, match=f"^{re.escape(f'--bind {address!r}: {said}')}$"):
        parse_link_bind(address)
    spec = f"{bracketed}:1=127.0.0.1:2"
    with pytest.raises(ConfigError, match=f"^{re.escape(f'SPEC {spec!r}: {said}')}$"):
        build_links([spec])
    metrics = f"{bracketed}:9100"
    with pytest.raises(ConfigError, match=f"^{re.escape(f'--metrics {metrics!r}: {said}')}$"):
        config.parse_metrics_address(metrics)


@pytest.mark.parametrize("address", ["0.0.0.0", "::", "127.0.0.1", "::1", "198.18.0.1",
                                     "fe80::1%lo"])
def test_listening_addresses_a_client_can_reach_are_taken(address: str) -> None:
    assert parse_link_bind(address) == address


_NOT_LINK_LOCAL = ["2001:db8::1", "fd00::5", "::1", "::", "::ffff:198.18.0.5"]


@pytest.mark.parametrize("zone", ["lo", "eth0", "ifb0", "1"])
@pytest.mark.parametrize("address", _NOT_LINK_LOCAL)
def test_a_zone_on_an_address_that_is_not_link_local_is_refused(address: str, zone: str) -> None:
    """`0=[::1%lo]:6379` started, and every connection failed: getaddrinfo parses a zone
    name only on a link-local address ("Name or service not known"). And Linux ignores a
    scope id on any other, so `[::1%1]` and `[::1%lo]:7000` (a listener) meant nothing
    but ::1, which overlapped `[::1]:7000` unseen. A zone is for fe80::/10 alone."""
    host = f"{address}%{zone}"
    refused = (f"{config.quoted(host)} is not link-local (fe80::/10), the only addresses a "
               f"zone applies to: drop the '%{zone}'")
    for spec in (f"0=[{host}]:6379", f"[{host}]:7000=127.0.0.1:6379"):
        with pytest.raises(ConfigError, match=f"^{re.escape(f'SPEC {spec!r}: {refused}')}$"):
            build_links([spec])
    with pytest.raises(ConfigError, match=f"^{re.escape(f'--bind {host!r}: {refused}')}$"):
        parse_link_bind(host)
    with pytest.raises(ConfigError, match=re.escape(f"variable A_PORT_1_TCP: {refused}")):
        build_links([], {"A_PORT_1_TCP": f"tcp://[{host}]:1"})
    with pytest.raises(ConfigError, match=re.escape(f"--metrics '[{host}]:0': {refused}")):
        check_metrics_port(f"[{host}]:0", [])


def test_a_dotted_link_alias_is_a_link() -> None:
    """`docker run --link db:app.db` exports APP.DB_PORT_5432_TCP (Docker keeps the dot);
    it was skipped without a word."""
    links, warnings = links_from_env({"APP.DB_PORT_5432_TCP": "tcp://10.0.0.5:5432",
                                      "CACHE_PORT_6379_TCP": "tcp://10.0.0.6:6379"})
    assert [(link.names, link.port, str(link.target)) for link in links] == [
        (("APP.DB_PORT_5432_TCP",), 5432, "10.0.0.5:5432"),
        (("CACHE_PORT_6379_TCP",), 6379, "10.0.0.6:6379"),
    ]
    assert warnings == []


def test_link_variable_ports_with_leading_zeros_are_their_value() -> None:
    links, _ = links_from_env({"A_PORT_024010_TCP": "tcp://127.0.0.1:0024011"})
    assert [(link.port, link.target.port) for link in links] == [(24010, 24011)]
    # And their place, by port: 443 before 999, however many zeros lead it.
    links, _ = links_from_env({"A_PORT_0443_TCP": "tcp://127.0.0.1:1",
                               "A_PORT_999_TCP": "tcp://127.0.0.1:2"})
    assert [link.port for link in links] == [443, 999]


@given(st.from_regex(r"0{0,8}[0-9]{1,7}", fullmatch=True))
def test_a_port_is_refused_as_out_of_range_only_when_it_is(text: str) -> None:
    """One rule for every spelling: the value decides, however many zeros lead it."""
    try:
        link = parse_spec(f"24000=127.0.0.1:{text}")
    except ConfigError as exc:
        assert not 1 <= int(text) <= 65535, exc
        assert f"port {text!r} is out of range (1-65535)" in str(exc)
        return
    assert link.target.port == int(text)


CAN_BE_OFF = ("--idle-timeout", "--halfclose-timeout", "--user-timeout", "--resolve-every")


@pytest.mark.parametrize(
    ("flag", "text", "value"),
    [
        ("--connect-timeout", "0.001", 0.001),
        ("--connect-timeout", "30", 30.0),
        ("--idle-timeout", ".5", 0.5),
        ("--idle-timeout", "5.", 5.0),
        ("--halfclose-timeout", "1E3", 1000.0),
        ("--grace", "0", 0.0),  # a plain "stop now"
        ("--grace", "0.0", 0.0),
        ("--grace", "0e5", 0.0),
        ("--resolve-every", "1", 1.0),
        ("--resolve-every", "2000000", 2_000_000.0),
        ("--user-timeout", "0.5", 0.5),
        ("--user-timeout", "30", 30.0),
        ("--user-timeout", "2000000", 2_000_000.0),  # 2e9 ms: the kernel's int holds it
    ],
)
def test_durations_parse(flag: str, text: str, value: float) -> None:
    assert parse_seconds(text, flag, can_be_off=flag in CAN_BE_OFF) == value


@pytest.mark.parametrize(
    ("flag", "text", "message"),
    [
        # Shorter than poll()'s millisecond: useless, like 0.
        ("--connect-timeout", "1e-320", "--connect-timeout 1e-320: at least 0.001 seconds"),
        ("--idle-timeout", "1e-9", "--idle-timeout 1e-9: at least 0.001 seconds, or 'off'"),
        ("--grace", "1e-9", "--grace 1e-9: 0 or at least 0.001 seconds"),
        # Not a zero as typed, though float() makes it one.
        ("--grace", "1e-400", "--grace 1e-400: 0 or at least 0.001 seconds"),
        # Shown as typed, not as the float they became ('-0.0', '0.0', '0.2').
        ("--connect-timeout", "-0", "--connect-timeout '-0': at least 0.001 seconds"),
        ("--halfclose-timeout", "1e-400",
         "--halfclose-timeout 1e-400: at least 0.001 seconds, or 'off'"),
        ("--resolve-every", "0.20", "--resolve-every 0.20: at least 1 second, or 'off'"),
        # What float() takes but a plain ASCII decimal number is not.
        ("--connect-timeout", "\u0663", "--connect-timeout '\u0663': not a number of seconds"),
        ("--connect-timeout", "1_0", "--connect-timeout '1_0': not a number of seconds"),
        ("--grace", "+5", "--grace '+5': not a number of seconds"),
        ("--grace", " 5", "--grace ' 5': not a number of seconds"),
        ("--idle-timeout", "inf", "--idle-timeout 'inf': not a number of seconds"),
        ("--idle-timeout", "1e", "--idle-timeout '1e': not a number of seconds"),
        ("--idle-timeout", "1.2.3", "--idle-timeout '1.2.3': not a number of seconds"),
    ],
)
def test_bad_durations_are_shown_as_typed(flag: str, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_seconds(text, flag, can_be_off=flag in CAN_BE_OFF)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("text", "value"),
    [(None, None), ("off", None), ("OFF", None), ("1", 1), ("60", 60),
     ("60.0", 60), ("1e3", 1000), ("032767", 32767)],
)
def test_keepalive_is_whole_seconds_or_off(text: str | None, value: int | None) -> None:
    parsed = parse_keepalive(text)
    assert parsed == value and type(parsed) is type(value)  # an int: setsockopt takes no float


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # The kernel counts keepalive in whole seconds: a fraction is refused, not rounded.
        ("1.5", "--keepalive '1.5': a whole number of seconds from 1 to 32767, or 'off'"),
        ("0.5", "--keepalive '0.5': a whole number of seconds from 1 to 32767, or 'off'"),
        ("0", "--keepalive '0': a whole number of seconds from 1 to 32767, or 'off'"),
        ("-0", "--keepalive '-0': a whole number of seconds from 1 to 32767, or 'off'"),
        ("-5", "--keepalive '-5': a whole number of seconds from 1 to 32767, or 'off'"),
        # TCP_KEEPIDLE's limit (MAX_TCP_KEEPIDLE): setsockopt would fail in every child.
        ("32768", "--keepalive '32768': a whole number of seconds from 1 to 32767, or 'off'"),
        ("1e999", "--keepalive '1e999': a whole number of seconds from 1 to 32767, or 'off'"),
        ("1e-400", "--keepalive '1e-400': a whole number of seconds from 1 to 32767, or 'off'"),
        ("soon", "--keepalive 'soon': not a number of seconds"),
        ("nan", "--keepalive 'nan': not a number of seconds"),
        ("+5", "--keepalive '+5': not a number of seconds"),
        # The flag given empty (no variable reaches here empty: it counts as unset).
        ("", "--keepalive '': empty: give a number of seconds, or 'off'"),
    ],
)
def test_bad_keepalive_is_named(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_keepalive(text)
    assert str(caught.value) == message


@pytest.mark.parametrize("value", [0, 32768, 1.5, True])
def test_options_with_a_keepalive_the_kernel_cannot_take_are_refused(value: object) -> None:
    """The supervisor checks what it is handed just as the command line does."""
    with pytest.raises(ConfigError, match=re.escape(f"--keepalive {value!r}: a whole number")):
        check_options(Options(keepalive=value))  # type: ignore[arg-type]


@pytest.mark.parametrize("text", [None, "off", "OFF", "none"])
def test_user_timeout_is_off_unless_set(text: str | None) -> None:
    assert parse_seconds(text, "--user-timeout") is None


@pytest.mark.parametrize("flag", ["--user-timeout", "--resolve-every", "--grace"])
def test_a_duration_given_empty_is_refused(flag: str) -> None:
    """'' was `off` (--resolve-every: not its default, 30); no variable reaches here
    empty (it counts as unset), so it is the flag given empty: bad input."""
    off = ", or 'off'" if flag != "--grace" else ""
    with pytest.raises(ConfigError) as caught:
        parse_seconds("", flag, can_be_off=flag != "--grace")
    assert str(caught.value) == f"{flag} '': empty: give a number of seconds{off}"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0.0, "--user-timeout 0: at least 0.001 seconds, or 'off'"),  # 0: the kernel's "off"
        (float("nan"), "--user-timeout nan: not a finite number of seconds"),
        (3e6, "--user-timeout 3e+06: at most 2,000,000 seconds"),  # past the kernel's int of ms
    ],
)
def test_options_with_a_user_timeout_the_kernel_cannot_take_are_refused(
    value: float, message: str
) -> None:
    """The supervisor checks what it is handed just as the command line does."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_options(Options(user_timeout=value))


def test_options_with_a_duration_under_a_millisecond_are_refused() -> None:
    """The supervisor checks what it is handed just as the command line does."""
    with pytest.raises(ConfigError, match=re.escape("--idle-timeout 1e-09: at least 0.001")):
        check_options(Options(idle_timeout=1e-9))


@given(st.one_of(st.text(max_size=30), st.from_regex(r"-?[0-9.]{0,8}([eE][+-]?[0-9]{1,4})?",
                                                      fullmatch=True)))
def test_any_duration_is_plain_and_in_range_or_a_config_error(text: str) -> None:
    try:
        value = parse_seconds(text, "--idle-timeout")
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith("--idle-timeout ") and "\n" not in message
        if text.isascii() and text.isprintable() and "\\" not in text:
            assert text in message  # as typed
        return
    if value is not None:
        assert re.fullmatch(r"[0-9.eE+-]+", text)
        assert 0.001 <= value <= 2_000_000


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("0x7f.1", "'0x7f.1' is not a valid IPv4 address (four decimal numbers from 0 to 255, "
         "a.b.c.d)"),
        ("1.0x7f", "'1.0x7f' is not a valid IPv4 address"),
        ("0X7F.0.0.1", "'0X7F.0.0.1' is not a valid IPv4 address"),
        ("0xcafe", "'0xcafe' is not a valid IPv4 address"),
        ("017.1", "'017.1' is not a valid IPv4 address"),
        ("1.2.3", "'1.2.3' is not a valid IPv4 address"),
        ("0x7f.1.", "'0x7f.1.' is not a valid IPv4 address"),
        ("0x.1", "'0x.1' is not a valid host name (its last label is all digits)"),
        ("08.1", "'08.1' is not a valid IPv4 address"),
        ("db.1", "'db.1' is not a valid host name (its last label is all digits)"),
        # Four decimal numbers as typed: the message says what else is wrong (it said
        # "four decimal numbers" to whoever had typed four).
        ("010.0.0.1", "'010.0.0.1' is not a valid IPv4 address (no leading zeros: "
         "getaddrinfo would read 010 as octal)"),
        ("10.0.0.07", "'10.0.0.07' is not a valid IPv4 address (no leading zeros: "
         "getaddrinfo would read 07 as octal)"),
        ("127.0.0.1.", "'127.0.0.1.' is not a valid IPv4 address (an address takes no "
         "trailing dot)"),
        # An internationalized name: glibc looks up only the ASCII form (AI_IDN aside).
        ("bücher.example", "'bücher.example' is not a valid host name or address (write "
         "it in its ASCII form, 'xn--bcher-kva.example')"),
        ("bü cher.example", "'bü cher.example' is not a valid host name or address"),
    ],
)
def test_numeric_looking_hosts_are_refused_alike(host: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_spec(f"24000={host}:24001")
    assert str(caught.value).startswith(f"SPEC '24000={host}:24001': {message}")


@pytest.mark.parametrize(
    "host",
    ["db1.example", "1password.internal", "redis-0", "0x7f.example", "a.0x7f", "1.example.",
     "0xdead.beef", "12a"],
)
def test_names_with_digits_are_still_names(host: str) -> None:
    assert parse_spec(f"24000={host}:24001").target == Endpoint(host, 24001)


def _libc_address(host: str) -> str | None:
    """What getaddrinfo makes of `host` without any lookup (AI_NUMERICHOST), or None."""
    import socket

    try:
        found = socket.getaddrinfo(host, None, socket.AF_INET, 0, 0, socket.AI_NUMERICHOST)
    except socket.gaierror:
        return None
    return str(found[0][4][0])


@given(st.from_regex(r"((0[xX])?[0-9a-fA-F]{1,5}|[0-9]{1,3}|[a-z]{1,2})(\.((0[xX])?[0-9a-fA-F]"
                     r"{1,5}|[0-9]{1,3}|[a-z]{1,2})){0,4}\.?", fullmatch=True))
def test_no_accepted_name_is_an_address_to_libc(host: str) -> None:
    """A name we accept must reach DNS: libc must not read it as an address instead."""
    try:
        target = parse_spec(f"24000={host}:24001").target
    except ConfigError:
        return
    if target.is_name:
        assert _libc_address(host) is None, host
    else:
        assert _libc_address(host) == target.host


def test_relay_mode_is_the_interned_constant() -> None:
    # A relay child reads the mode and compares it with relay.Flow's constant: one object
    # is one reference count written per child, not two (docs/benchmarks.md, "Page
    # faults per connection"). A mode built at run time (from JSON, say) is interned.
    from forkproxy.config import Options

    built = "".join(["au", "to"])
    assert Options(relay=built).relay is "auto"  # noqa: F632
