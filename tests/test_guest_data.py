"""Guest data in the document: what is refused (by path, never repeating a secret), how
vm_data and vm_passwords merge, and what a password's generation says about answering it."""

from __future__ import annotations

import base64

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_document import problems_of, validate
from vr.control.agent import redact
from vr.foundation import document as docmod

WEB1, DB1 = "02:00:00:00:01:10", "02:00:00:00:02:10"


def ssh_key(comment: str = "a@b") -> str:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    public = ed25519.Ed25519PrivateKey.generate().public_key()
    return public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode() + f" {comment}"


KEY = ssh_key()


def with_data(example: dict, *vms: dict, generation: int = 1) -> dict:
    return {**example, "generation": generation, "guest_data": {"vms": list(vms)}}


def vms_of(doc: docmod.RouterDocument) -> dict[str, docmod.VmData]:
    return {vm.mac: vm for vm in doc.guest_data.vms}


def test_guest_data_loads_and_its_stored_form_loads_back(example):
    doc = validate(with_data(example, {"mac": WEB1, "user_data": base64.b64encode(b"#cloud-config\n").decode(),
                                       "meta_data": {"instance-id": "i-1", "my.key": "value"},
                                       "public_keys": [KEY, ssh_key("c@d")], "password": "Pw-1"}))  # fmt: skip
    vm = vms_of(doc)[WEB1]
    assert vm.password_generation == 1 and vm.meta_data["my.key"] == "value" and len(vm.public_keys) == 2
    assert docmod.build_document(doc.model_dump(mode="json")) == doc  # a daemon restart loads what was stored


@pytest.mark.parametrize(
    ("vm", "path", "reason"),
    [
        ({"mac": WEB1, "user_data": base64.b64encode(b"x" * 32769).decode()}, "guest_data.vms[0].user_data", "32768"),
        ({"mac": WEB1, "user_data": "aGk=\n"}, "guest_data.vms[0].user_data", "base64"),
        ({"mac": WEB1, "public_keys": ["ssh-ed25519 AAAA"]}, "guest_data.vms[0].public_keys[0]", "not base64 of a key"),
        ({"mac": WEB1, "public_keys": [KEY.replace("ssh-ed25519", "ssh-rsa", 1)]}, "guest_data.vms[0].public_keys[0]",
         "not a ssh-rsa key"),
        ({"mac": WEB1, "public_keys": [KEY + "\r"]}, "guest_data.vms[0].public_keys[0]", "no newline"),
        ({"mac": WEB1, "public_keys": ["from=\"x\" " + KEY]}, "guest_data.vms[0].public_keys[0]", "not a key type"),
        ({"mac": WEB1, "public_keys": [KEY] * 33}, "guest_data.vms[0].public_keys", "at most 32"),
        ({"mac": WEB1, "meta_data": {"user-data": "x"}}, "guest_data.vms[0].meta_data", "own field"),
        ({"mac": WEB1, "meta_data": {"a/b": "x"}}, "guest_data.vms[0].meta_data.'a/b'", "meta data key"),
        ({"mac": WEB1, "meta_data": {"k": "a\x00b"}}, "guest_data.vms[0].meta_data.k", "control characters"),
        ({"mac": WEB1, "password": "<redacted>"}, "guest_data.vms[0].password", "GET /v1/config shows"),
        ({"mac": WEB1, "password": "pass word"}, "guest_data.vms[0].password", "without spaces"),
        ({"mac": "02:00:00:00:09:99"}, "guest_data.vms[0].mac", "no VM has MAC"),
    ],
)  # fmt: skip
def test_bad_guest_data_is_refused_by_path(example, vm, path, reason):
    found = problems_of(with_data(example, vm))
    assert reason in found.get(path, ""), found
    assert "pass word" not in " ".join(found.values())


def test_the_same_mac_twice_and_a_hostname_taken_by_data_server_are_refused(example):
    assert "is also guest_data.vms[0]" in problems_of(with_data(example, {"mac": WEB1}, {"mac": WEB1}))["guest_data.vms[1].mac"]
    example["dhcp"]["entries"][0]["hostname"] = "data-server"
    assert "data-server" in problems_of(example)["dhcp.entries[0].hostname"]


def test_a_password_is_stamped_by_the_payload_that_set_it(example):
    stored = validate(with_data(example, {"mac": WEB1, "password": "Pw-1"}, {"mac": DB1}))
    # The whole section again, the same password: the same one, not to be answered again.
    again = validate(with_data(example, {"mac": WEB1, "password": "Pw-1"}, {"mac": DB1}, generation=2), stored)
    assert vms_of(again)[WEB1].password_generation == 1
    # vm_passwords: a new one, even the same text, for a VM with guest data or without.
    changed = validate({"generation": 3, "vm_passwords": [{"mac": WEB1, "password": "Pw-1"},
                                                          {"mac": DB1, "password": "Pw-2"}]}, again)  # fmt: skip
    assert vms_of(changed)[WEB1].password_generation == 3 and vms_of(changed)[DB1].password_generation == 3
    assert vms_of(changed)[WEB1].password == "Pw-1" and vms_of(changed)[DB1].password == "Pw-2"
    # vm_data changes other fields: the password set before stays as it was.
    edited = validate({"generation": 4, "vm_data": {"upsert": [{"mac": DB1, "password": "Pw-2",
                                                                "meta_data": {"vm-id": "7"}}]}}, changed)  # fmt: skip
    assert vms_of(edited)[DB1].password_generation == 3 and vms_of(edited)[DB1].meta_data == {"vm-id": "7"}
    # A manager's password_generation is not its to set.
    forged = validate({"generation": 5, "vm_data": {"upsert": [{"mac": DB1, "password": "Pw-9",
                                                                "password_generation": 1}]}}, edited)  # fmt: skip
    assert vms_of(forged)[DB1].password_generation == 5
    cleared = validate({"generation": 6, "vm_passwords": [{"mac": DB1, "password": None}]}, forged)
    assert vms_of(cleared)[DB1].password is None and vms_of(cleared)[DB1].password_generation is None


def test_a_vm_deleted_from_dhcp_entries_loses_its_guest_data(example):
    stored = validate(with_data(example, {"mac": WEB1, "password": "Pw-1"}, {"mac": DB1, "user_data": "aGk="}))
    after = validate({"generation": 2, "dhcp_entries": {"delete": [WEB1]}}, stored)
    assert list(vms_of(after)) == [DB1]
    example["dhcp"]["entries"] = [e for e in example["dhcp"]["entries"] if e["mac"] != DB1]
    whole = validate({"generation": 3, "dhcp": example["dhcp"]}, after)  # a whole dhcp section without db1
    assert vms_of(whole) == {}


def test_vm_passwords_for_an_unknown_vm_or_twice_are_refused_without_the_password(example):
    stored = validate(example)
    found = problems_of({"generation": 2, "vm_passwords": [{"mac": "02:00:00:00:09:99", "password": "Secret-1"},
                                                            {"mac": WEB1, "password": "Secret-2"},
                                                            {"mac": WEB1, "password": "Secret-3"}]}, stored)  # fmt: skip
    assert "no VM has MAC" in found["vm_passwords[0].mac"] and "is also vm_passwords[1]" in found["vm_passwords[2].mac"]
    assert "Secret" not in " ".join(found.values())


def test_user_data_and_passwords_are_redacted_from_the_document_shown(example):
    doc = validate(with_data(example, {"mac": WEB1, "user_data": "aGk=", "password": "Pw-1", "public_keys": [KEY]}))
    shown = redact(doc.model_dump(mode="json"))["guest_data"]["vms"][0]
    assert shown["user_data"] == "<redacted>" and shown["password"] == "<redacted>" and shown["public_keys"] == [KEY]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_any_text_is_a_key_or_refused_with_a_reason(text):
    """Never another exception (the CLI and the agent turn ValueError into the path's reason)."""
    try:
        assert docmod._ssh_public_key(text) == text
    except ValueError as error:
        assert str(error).startswith(("not an SSH public key", "an SSH public key"))


def test_an_anti_spoofing_tier_without_a_known_vm_is_warned_about(example):
    from vr.transaction.pipeline import Pipeline

    pipeline = Pipeline.__new__(Pipeline)  # validation needs no directories
    example["dhcp"]["entries"] = [e for e in example["dhcp"]["entries"] if e["tier"] != "tier2"]
    _, _, warnings = Pipeline._validated(pipeline, example, None)
    assert [(w.path, "drops everything" in w.reason) for w in warnings] == [("interfaces[3].anti_spoofing", True)]
    example["interfaces"][3]["anti_spoofing"] = False  # its guests are not the router's to know
    assert Pipeline._validated(pipeline, {**example, "generation": 2}, None)[2] == []
    example["interfaces"][1]["anti_spoofing"] = True
    assert "applies to a guest interface" in problems_of(example)["interfaces[1]"]
