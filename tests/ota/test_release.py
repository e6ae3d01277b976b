"""Release documents: canonical JSON, Ed25519 signatures from trusted keys, threshold,
expiry, name and size, each refusal a one-line reason (device side, before any download)."""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ota_util import MAX, NOW, Keys  # type: ignore[import-not-found]

from agent.errors import ConfigError, ReleaseError
from agent.ota import release
from agent.ota.release import Policy

SHA_A = "a" * 64
SHA_B = "b" * 64
SHA_L = hashlib.sha256(b"square\ndisc").hexdigest()


def signed_block(**overrides: Any) -> dict[str, Any]:
    block: dict[str, Any] = {
        "type": "fogwhisk-model-release", "spec": 1, "name": "shapes-ssd", "version": 3,
        "expires": "2030-01-31T12:00:00Z",
        "artifact": {"sha256": SHA_A, "size": 133120},
        "model": {"sha256": SHA_B, "inputs": [{"shape": [1, 96, 96, 3], "dtype": "uint8"}],
                  "outputs": [{"shape": [1, 10], "dtype": "float32"}],
                  "labels_sha256": SHA_L},
        "policy": {"max_latency_ratio": 2.0, "max_error_rate": 0.05},
    }
    block.update(overrides)
    return block


def document(keys: Keys | list[Keys], **overrides: Any) -> bytes:
    signers = keys if isinstance(keys, list) else [keys]
    doc = release.sign(signed_block(**overrides), signers[0].private)
    for k in signers[1:]:
        doc = release.cosign(doc, k.private)
    return json.dumps(doc, indent=2).encode()


def verify(doc: bytes, keys: Keys | list[Keys], threshold: int = 1, **kw: Any) -> release.Release:
    trusted = keys if isinstance(keys, list) else [keys]
    args: dict[str, Any] = {"topic_name": "shapes-ssd", "max_bytes": MAX, "now": NOW}
    args.update(kw)
    return release.parse_and_verify(
        doc, keys={k.keyid: k.public for k in trusted}, threshold=threshold, **args)


def reason(doc: bytes, keys: Keys | list[Keys], threshold: int = 1, **kw: Any) -> str:
    with pytest.raises(ReleaseError) as info:
        verify(doc, keys, threshold, **kw)
    text = info.value.reason
    assert text == str(info.value)
    assert "\n" not in text and text.strip() == text and len(text) < 300, text
    return text


def test_canonical_json_sorts_keys_without_whitespace_and_keeps_unicode() -> None:
    assert release.canonical({"b": [1, {"d": 2, "c": "é"}], "a": None}) == \
        '{"a":null,"b":[1,{"c":"é","d":2}]}'.encode()


def test_keyid_is_the_first_16_hex_digits_of_sha256_of_the_raw_public_key(
        ota_keys: Keys) -> None:
    raw = ota_keys.public.public_bytes(serialization.Encoding.Raw,
                                       serialization.PublicFormat.Raw)
    assert ota_keys.keyid == hashlib.sha256(raw).hexdigest()[:16]


def test_a_signed_release_verifies_and_every_field_reads_back(ota_keys: Keys) -> None:
    doc = document(ota_keys, policy={"max_latency_ratio": 1.5, "probation_s": 300.0,
                                     "max_error_rate": 0.01, "min_golden_recall": 0.9,
                                     "shadow": {"frames": 50}})
    r = verify(doc, ota_keys)
    assert (r.name, r.version, r.artifact_sha256, r.artifact_size) == \
        ("shapes-ssd", 3, SHA_A, 133120)
    assert r.expires == NOW + timedelta(days=30)
    assert (r.model_sha256, r.labels_sha256) == (SHA_B, SHA_L)
    assert r.inputs == ({"shape": [1, 96, 96, 3], "dtype": "uint8"},)
    assert r.outputs == ({"shape": [1, 10], "dtype": "float32"},)
    assert r.policy == Policy(max_latency_ratio=1.5, probation_s=300.0, max_error_rate=0.01,
                              min_golden_recall=0.9, shadow={"frames": 50})
    assert r.locations == ()
    assert r.raw == doc
    assert r.keyids == (ota_keys.keyid,)


def test_policy_defaults_apply_to_keys_the_release_leaves_out(ota_keys: Keys) -> None:
    r = verify(document(ota_keys, policy={}), ota_keys)
    assert r.policy == Policy()
    assert (r.policy.max_latency_ratio, r.policy.max_error_rate, r.policy.probation_s) == \
        (2.0, 0.05, None)


def test_signature_is_ed25519_over_the_canonical_signed_block(ota_keys: Keys) -> None:
    doc = json.loads(document(ota_keys))
    (sig,) = doc["signatures"]
    assert sig["keyid"] == ota_keys.keyid
    ota_keys.public.verify(base64.b64decode(sig["sig"]), release.canonical(doc["signed"]))


def test_unsigned_https_locations_are_kept_for_the_fetcher(ota_keys: Keys) -> None:
    doc = json.loads(document(ota_keys))
    doc["locations"] = ["https://cdn.example/a.tar", "https://127.0.0.1:8443/a.tar"]
    r = verify(json.dumps(doc).encode(), ota_keys)
    assert r.locations == ("https://cdn.example/a.tar", "https://127.0.0.1:8443/a.tar")


def test_threshold_counts_distinct_trusted_keys_with_valid_signatures(
        ota_keys: Keys, other_keys: Keys, third_keys: Keys) -> None:
    both = document([ota_keys, other_keys])
    assert set(verify(both, [ota_keys, other_keys], threshold=2).keyids) == \
        {ota_keys.keyid, other_keys.keyid}
    # The same key's signature twice is still one key.
    doc = json.loads(document(ota_keys))
    doc["signatures"] = doc["signatures"] * 2
    twice = json.dumps(doc).encode()
    assert "1 valid signature from trusted keys, threshold is 2" in \
        reason(twice, [ota_keys, other_keys], threshold=2)
    # A trusted key's signature over other content does not count.
    doc = json.loads(both)
    doc["signatures"][1]["sig"] = json.loads(document(other_keys, version=4))["signatures"][0][
        "sig"]
    assert "bad signature" in reason(json.dumps(doc).encode(), [ota_keys, other_keys],
                                     threshold=2)
    # A valid signature from a key the device does not trust does not count either.
    assert "threshold is 2" in reason(both, [ota_keys, third_keys], threshold=2)


def test_cosign_replaces_an_earlier_signature_of_the_same_key(
        ota_keys: Keys, other_keys: Keys) -> None:
    doc = release.sign(signed_block(), ota_keys.private)
    doc = release.cosign(release.cosign(doc, other_keys.private), other_keys.private)
    assert [s["keyid"] for s in doc["signatures"]] == [ota_keys.keyid, other_keys.keyid]


BAD: list[tuple[str, Any, str]] = [
    # (case, how the document is made from a good one, words the reason must contain)
    ("not JSON", lambda d, k: b"{not json", "not JSON"),
    ("not UTF-8", lambda d, k: b"\xff\xfe{}", "not JSON"),
    ("a JSON list", lambda d, k: b"[1, 2]", "not a JSON object"),
    ("NaN", lambda d, k: d.replace(b'"spec": 1', b'"spec": NaN'), "not JSON"),
    ("deeply nested", lambda d, k: b"[" * 100000 + b"]" * 100000, "bytes"),
    ("nested within the size", lambda d, k: b"[" * 30000 + b"]" * 30000, "not JSON"),
    ("no signed block", lambda d, k: b'{"signatures": []}', "no signed block"),
    ("no signatures", lambda d, k: _edit(d, lambda o: o.pop("signatures")), "unsigned"),
    ("empty signatures", lambda d, k: _edit(d, lambda o: o.update(signatures=[])), "unsigned"),
    ("signature not an object",
     lambda d, k: _edit(d, lambda o: o.update(signatures=["x"])), "signature"),
    ("signature not base64",
     lambda d, k: _edit(d, lambda o: o["signatures"][0].update(sig="!!!")), "base64"),
    ("unknown key", lambda d, k: document(k), "unknown key"),
    ("tampered version",
     lambda d, k: _edit(d, lambda o: o["signed"].update(version=9)), "bad signature"),
    ("tampered size",
     lambda d, k: _edit(d, lambda o: o["signed"]["artifact"].update(size=1)), "bad signature"),
    ("tampered policy",
     lambda d, k: _edit(d, lambda o: o["signed"]["policy"].update(max_latency_ratio=99.0)),
     "bad signature"),
    ("added signed key",
     lambda d, k: _edit(d, lambda o: o["signed"].update(extra=1)), "bad signature"),
]


def _edit(doc: bytes, change: Any) -> bytes:
    obj = json.loads(doc)
    change(obj)
    return json.dumps(obj).encode()


@pytest.mark.parametrize(("case", "make", "words"), BAD, ids=[c for c, _, _ in BAD])
def test_a_bad_document_is_refused_with_a_one_line_reason(
        ota_keys: Keys, other_keys: Keys, case: str, make: Any, words: str) -> None:
    doc = make(document(ota_keys), other_keys)
    assert words in reason(doc, ota_keys)


SIGNED_BAD: list[tuple[str, dict[str, Any], str]] = [
    # Signed by a trusted key, yet not acceptable.
    ("expired", {"expires": "2030-01-01T11:59:59Z"}, "expired at 2030-01-01T11:59:59Z"),
    ("expiry without zone", {"expires": "2030-02-01T00:00:00"}, "expires"),
    ("expiry not a time", {"expires": "soon"}, "expires"),
    ("other name", {"name": "person"}, "'person'"),
    ("too large", {"artifact": {"sha256": SHA_A, "size": MAX + 1}}, "more than"),
    ("empty artifact", {"artifact": {"sha256": SHA_A, "size": 0}}, "artifact.size"),
    ("size not a number", {"artifact": {"sha256": SHA_A, "size": "1"}}, "artifact.size"),
    ("bad sha", {"artifact": {"sha256": "A" * 64, "size": 1}}, "artifact.sha256"),
    ("other type", {"type": "tuf-targets"}, "type"),
    ("newer spec", {"spec": 2}, "spec 2"),
    ("version zero", {"version": 0}, "version"),
    ("version a bool", {"version": True}, "version"),
    ("version a float", {"version": 3.0}, "version"),
    ("unknown signed key", {"extra": 1}, "'extra'"),
    ("unknown policy key", {"policy": {"max_speed": 1}}, "'max_speed'"),
    ("policy ratio not a number", {"policy": {"max_latency_ratio": "2"}}, "max_latency_ratio"),
    ("policy ratio not positive", {"policy": {"max_latency_ratio": 0}}, "max_latency_ratio"),
    ("policy error rate above 1", {"policy": {"max_error_rate": 1.5}}, "max_error_rate"),
    ("policy shadow not a table", {"policy": {"shadow": 3}}, "shadow"),
    ("golden recall above 1", {"policy": {"min_golden_recall": 1.2}},
     "policy.min_golden_recall must lie in [0, 1]"),
    ("golden recall negative", {"policy": {"min_golden_recall": -0.1}},
     "policy.min_golden_recall must lie in [0, 1]"),
    ("golden precision a string", {"policy": {"min_golden_precision": "0.9"}},
     "policy.min_golden_precision must be a number, got '0.9'"),
    ("golden precision a bool", {"policy": {"min_golden_precision": True}},
     "policy.min_golden_precision must be a number"),
    ("tensor without shape",
     {"model": {"sha256": SHA_B, "inputs": [{"dtype": "uint8"}], "outputs": [],
                "labels_sha256": SHA_L}}, "model.inputs"),
    ("model without labels hash",
     {"model": {"sha256": SHA_B, "inputs": [], "outputs": []}}, "model"),
]


@pytest.mark.parametrize(("case", "overrides", "words"), SIGNED_BAD,
                         ids=[c for c, _, _ in SIGNED_BAD])
def test_a_validly_signed_but_unacceptable_release_is_refused(
        ota_keys: Keys, case: str, overrides: dict[str, Any], words: str) -> None:
    assert words in reason(document(ota_keys, **overrides), ota_keys)


def test_the_name_is_compared_with_the_deploy_topic(ota_keys: Keys) -> None:
    text = reason(document(ota_keys), ota_keys, topic_name="person")
    assert text == "release names model 'shapes-ssd', the deploy topic 'person'"


def test_a_release_expiring_after_now_is_accepted_up_to_its_last_second(
        ota_keys: Keys) -> None:
    doc = document(ota_keys, expires="2030-01-01T12:00:01Z")
    assert verify(doc, ota_keys).version == 3
    assert "expired" in reason(doc, ota_keys, now=NOW + timedelta(seconds=1))


def test_locations_must_be_a_list_of_https_urls(ota_keys: Keys) -> None:
    for locations in (["http://cdn.example/a.tar"], "https://x/a.tar", [3]):
        doc = json.loads(document(ota_keys))
        doc["locations"] = locations
        assert "locations" in reason(json.dumps(doc).encode(), ota_keys)


def test_unknown_top_level_keys_are_refused(ota_keys: Keys) -> None:
    doc = json.loads(document(ota_keys))
    doc["note"] = "x"
    assert "'note'" in reason(json.dumps(doc).encode(), ota_keys)


def test_a_threshold_below_one_is_a_programming_error(ota_keys: Keys) -> None:
    with pytest.raises(ValueError, match="threshold"):
        verify(document(ota_keys), ota_keys, threshold=0)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_changed_byte_is_refused_or_changes_nothing_signed(
        ota_keys: Keys, data: st.DataObject) -> None:
    """Flip one byte anywhere in a document: it is refused, or what it says is unchanged."""
    doc = document(ota_keys)
    good = verify(doc, ota_keys)
    i = data.draw(st.integers(0, len(doc) - 1))
    b = data.draw(st.integers(0, 255).filter(lambda v: v != doc[i]))
    bad = doc[:i] + bytes([b]) + doc[i + 1:]
    try:
        got = verify(bad, ota_keys)
    except ReleaseError as exc:
        assert "\n" not in exc.reason
        return
    assert (got.name, got.version, got.expires, got.artifact_sha256, got.artifact_size,
            got.model_sha256, got.inputs, got.outputs, got.labels_sha256, got.policy) == \
        (good.name, good.version, good.expires, good.artifact_sha256, good.artifact_size,
         good.model_sha256, good.inputs, good.outputs, good.labels_sha256, good.policy)


def test_keygen_writes_a_private_key_0600_and_a_public_key_as_pem(tmp_path: Path) -> None:
    key_path, pub_path = release.keygen(tmp_path / "keys")
    assert (key_path.name, pub_path.name) == ("ota.key", "ota.pub")
    assert key_path.stat().st_mode & 0o777 == 0o600
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub_path.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    private = release.load_private_key(key_path)
    (kid, public), = release.load_public_keys([pub_path]).items()
    assert kid == release.keyid(private.public_key()) == release.keyid(public)


def test_keygen_refuses_to_overwrite_either_file(tmp_path: Path) -> None:
    release.keygen(tmp_path)
    before = (tmp_path / "ota.key").read_bytes()
    with pytest.raises(ReleaseError, match="exists"):
        release.keygen(tmp_path)
    (tmp_path / "ota.key").unlink()
    with pytest.raises(ReleaseError, match=r"ota\.pub.*exists"):
        release.keygen(tmp_path)
    assert not (tmp_path / "ota.key").exists()
    assert before


def test_public_keys_that_cannot_be_used_are_config_errors_naming_the_file(
        tmp_path: Path, ota_keys: Keys) -> None:
    from cryptography.hazmat.primitives.asymmetric import ec
    missing = tmp_path / "missing.pub"
    with pytest.raises(ConfigError, match=r"missing\.pub"):
        release.load_public_keys([missing])
    garbage = tmp_path / "garbage.pub"
    garbage.write_text("hello")
    with pytest.raises(ConfigError, match=r"garbage\.pub.*PEM"):
        release.load_public_keys([garbage])
    ec_pub = tmp_path / "ec.pub"
    ec_pub.write_bytes(ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    with pytest.raises(ConfigError, match=r"ec\.pub.*Ed25519"):
        release.load_public_keys([ec_pub])
    with pytest.raises(ConfigError, match=r"ota\.key.*private"):
        release.load_public_keys([ota_keys.key_path])
    # The same key listed twice is one key.
    assert list(release.load_public_keys([ota_keys.pub_path, ota_keys.pub_path])) == \
        [ota_keys.keyid]


def test_a_private_key_that_cannot_be_used_is_refused_naming_the_file(
        tmp_path: Path, ota_keys: Keys) -> None:
    with pytest.raises(ReleaseError, match=r"ota\.pub.*private key"):
        release.load_private_key(ota_keys.pub_path)
    with pytest.raises(ReleaseError, match=r"nothing\.key"):
        release.load_private_key(tmp_path / "nothing.key")
