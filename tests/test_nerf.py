"""Nerf-dart keys, checked by hand and against npm's own code run by node."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from npmguard.npmrc.nerf import (
    InvalidRegistryError,
    candidate_keys,
    nerf_dart,
    split_credential_key,
    to_url,
)


def _npm_package() -> Path | None:
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        return None
    # npm is a symlink to <npm package>/bin/npm-cli.js.
    package = Path(os.path.realpath(npm)).parent.parent
    return package if (package / "package.json").is_file() else None


def run_node(script: str, payload: object) -> object:
    """Run ``script`` with npm's package dir as argv[1] and JSON on stdin."""
    package = _npm_package()
    node = shutil.which("node")
    if package is None or node is None:
        pytest.skip("node and npm are not installed")
    result = subprocess.run(
        [node, "-e", script, str(package)],
        input=json.dumps(payload).encode(),
        capture_output=True,
        env={"PATH": os.environ.get("PATH", os.defpath)},
        timeout=60,
        check=True,
    )
    return json.loads(result.stdout)


NERF_SCRIPT = r"""
const nerf = require(process.argv[1] + '/node_modules/@npmcli/config/lib/nerf-dart.js')
const urls = JSON.parse(require('fs').readFileSync(0, 'utf8'))
process.stdout.write(JSON.stringify(urls.map((url) => {
  try { return nerf(url) } catch (err) { return null }
})))
"""

# Feeds npm-registry-fetch's getAuth a token under every key in the list,
# takes the key it picks, removes it and calls again. The picks, in order,
# are npm's preference for that request URL.
ORDER_SCRIPT = r"""
const lib = '/node_modules/npm-registry-fetch/lib/auth.js'
const getAuth = require(process.argv[1] + lib)
const cases = JSON.parse(require('fs').readFileSync(0, 'utf8'))
process.stdout.write(JSON.stringify(cases.map(([uri, keys]) => {
  const opts = { registry: uri }
  for (const key of keys) opts[key + ':_authToken'] = 'token'
  const order = []
  for (;;) {
    const auth = getAuth(uri, opts)
    if (!auth.regKey) break
    order.push(auth.regKey)
    delete opts[auth.regKey + ':_authToken']
  }
  return order
})))
"""

NPM_CASES = [
    "https://registry.npmjs.org/",
    "https://registry.npmjs.org",
    "https://REGISTRY.Example.COM/npm/",
    "https://r.example:443/a/b/c",
    "http://r.example:80/",
    "http://r.example:443/",
    "https://r.example:80/x/",
    "https://r.example:8443/npm/pkg?x=1#frag",
    "https://user:pass@r.example/npm/",
    "https://[2001:DB8:0:0::1]:4873/npm/",
    "http://[::1]/",
    "http://127.1:4873/",
    "https://r.example/a/../b/./c/",
    "https://r.example/a\\b/",
    "https://r.example/with space/x",
    "https://r.example/caf\u00e9/x",
    "https://B\u00fccher.example/",
    "https://r.example/%2e%2e/x/",
    "https://r.example./",
    "//r.example/npm/",
]


@pytest.mark.parametrize("url", NPM_CASES)
def test_nerf_matches_npm(url: str) -> None:
    # npm's nerf-dart rejects "//host" input, which npmguard accepts.
    source = "https:" + url if url.startswith("//") else url
    expected = run_node(NERF_SCRIPT, [source])
    assert [nerf_dart(url)] == expected


@pytest.mark.parametrize(
    "registry",
    [
        "https://r.example/",
        "https://r.example/a/b/",
        "https://r.example/a/b",
        "https://r.example:8443/npm/repo/",
        "http://[::1]:4873/x/",
    ],
)
def test_candidates_match_npm(registry: str) -> None:
    keys = candidate_keys(registry)
    decoys = ["//other.example/", keys[0] + "deeper/"]
    request = registry.rstrip("/") + "/pkg"
    order = run_node(ORDER_SCRIPT, [[request, [*keys, *decoys, keys[0] + "pkg"]]])
    assert isinstance(order, list)
    # npm tries the package's own key first, then the registry's walk.
    assert order[0][0] == keys[0] + "pkg"
    assert order[0][1:] == keys


@pytest.mark.parametrize(
    ("url", "key"),
    [
        ("https://registry.npmjs.org/", "//registry.npmjs.org/"),
        ("https://r.example:443/", "//r.example/"),
        ("http://r.example:80/", "//r.example/"),
        ("https://r.example:8443/", "//r.example:8443/"),
        ("http://r.example:443/", "//r.example:443/"),
    ],
)
def test_nerf_default_port(url: str, key: str) -> None:
    assert nerf_dart(url) == key


def test_nerf_host_lowercased() -> None:
    assert nerf_dart("HTTPS://R.Example.COM/Npm/") == "//r.example.com/Npm/"


def test_nerf_path_cut() -> None:
    assert nerf_dart("https://r.example/npm/pkg") == "//r.example/npm/"


def test_nerf_no_path() -> None:
    assert nerf_dart("https://r.example") == "//r.example/"


def test_nerf_query_fragment() -> None:
    assert nerf_dart("https://r.example/a/?q=1#f") == "//r.example/a/"


def test_nerf_ipv6() -> None:
    assert nerf_dart("https://[2001:DB8::0:1]:8443/x") == "//[2001:db8::1]:8443/"


def test_nerf_ipv4_short() -> None:
    assert nerf_dart("http://127.1:4873/") == "//127.0.0.1:4873/"


def test_nerf_user_info() -> None:
    assert nerf_dart("https://me:secret@r.example/") == "//r.example/"


def test_nerf_key_input() -> None:
    assert nerf_dart("//r.example/npm/") == "//r.example/npm/"


def test_nerf_dot_segments() -> None:
    assert nerf_dart("https://r.example/a/../b/") == "//r.example/b/"


@pytest.mark.parametrize(
    "url",
    [
        "ftp://r.example/",
        "r.example",
        "",
        "https://",
        "https://r.example:99999/",
        "https://[zz::1]/",
        "https://r.example.256/",
    ],
)
def test_nerf_invalid(url: str) -> None:
    with pytest.raises(InvalidRegistryError):
        nerf_dart(url)


def test_candidates_order() -> None:
    assert candidate_keys("https://r.example/a/b/") == [
        "//r.example/a/b/",
        "//r.example/a/b",
        "//r.example/a/",
        "//r.example/a",
        "//r.example/",
        "//r.example",
    ]


def test_candidates_no_slash() -> None:
    assert candidate_keys("https://r.example/npm")[:2] == [
        "//r.example/npm/",
        "//r.example/npm",
    ]


def test_candidates_root() -> None:
    assert candidate_keys("https://r.example:8443") == [
        "//r.example:8443/",
        "//r.example:8443",
    ]


@pytest.mark.parametrize(
    ("key", "parts"),
    [
        ("//r.example/:_authToken", ("//r.example/", "_authToken")),
        ("//r.example:8443/npm/:_auth", ("//r.example:8443/npm/", "_auth")),
        ("//r.example/npm:username", ("//r.example/npm", "username")),
        ("//r.example:_password", ("//r.example", "_password")),
        ("//[::1]:4873/:_authToken", ("//[::1]:4873/", "_authToken")),
        ("//r.example/a:b/:certfile", ("//r.example/a:b/", "certfile")),
        ("_authToken", (None, "_authToken")),
        ("@scope:registry", (None, "@scope:registry")),
        ("//r.example/", (None, "//r.example/")),
    ],
)
def test_split_key(key: str, parts: tuple[str | None, str]) -> None:
    assert split_credential_key(key) == parts


@pytest.mark.parametrize(
    "url",
    ["https://r.example/", "https://r.example:8443/npm/", "http://[::1]:4873/x/"],
)
def test_key_url_roundtrip(url: str) -> None:
    scheme = url.split(":", 1)[0]
    assert to_url(nerf_dart(url), scheme) == url


def test_to_url_rejects() -> None:
    with pytest.raises(InvalidRegistryError):
        to_url("r.example/")
