"""DeviceStore contract: push registrations (replace, remove with and without the token, the
per-user cap and which registration it drops, many users at once, u64 ids, non-ASCII device
ids, tokens of the largest size) and revocations (only ever raised); all of it across a
restart."""

from __future__ import annotations

import pytest_twisted

from improto.limits import MAX_DEVICE_ID, U64_MAX
from improto_server.model import MAX_PUSH_TOKEN, MAX_TARGETS_PER_USER, PushTarget

PORT = "devices"

ALICE, BOB, CAROL = 1, 2, 3
HIGH = 2**63  # ids at and above 2**63 must work like any other

APNS = PushTarget("apns", "apns-token-1", preview=True)
FCM = PushTarget("fcm", "fcm-token-1", preview=False)


def store(backend):
    return backend.current.devices


def devices(n: int) -> list[str]:
    return [f"d{i:02}" for i in range(n)]


async def fill(backend, user: int, names: list[str], step_ms: int = 1) -> None:
    """Register `names` in this order, `step_ms` apart on the clock."""
    for name in names:
        await store(backend).set_target(user, name, PushTarget("fcm", f"tok-{name}", False))
        backend.advance(step_ms)


@pytest_twisted.ensureDeferred
async def test_register_read_back_and_replace(backend):
    d = store(backend)
    assert await d.targets([ALICE]) == {}
    await d.set_target(ALICE, "phone", APNS)
    assert await d.targets([ALICE]) == {ALICE: {"phone": APNS}}
    await d.set_target(ALICE, "phone", FCM)  # replaces: platform, token and flag
    await d.set_target(ALICE, "tablet", APNS)
    got = await d.targets([ALICE])
    assert got == {ALICE: {"phone": FCM, "tablet": APNS}}
    assert list(got[ALICE]) == ["phone", "tablet"]
    assert await d.targets([BOB]) == {}  # per user
    assert await d.targets([]) == {}


@pytest_twisted.ensureDeferred
async def test_remove_with_and_without_the_token(backend):
    d = store(backend)
    assert await d.remove_target(ALICE, "phone") is False
    assert await d.remove_target(ALICE, "phone", APNS.token) is False
    await d.set_target(ALICE, "phone", APNS)
    await d.set_target(ALICE, "tablet", FCM)
    # A dead-token report for a token the device no longer has removes nothing.
    assert await d.remove_target(ALICE, "phone", "an-older-token") is False
    assert await d.remove_target(ALICE, "phone", FCM.token) is False  # another device's
    assert await d.remove_target(BOB, "phone", APNS.token) is False  # another user's
    assert await d.targets([ALICE]) == {ALICE: {"phone": APNS, "tablet": FCM}}
    assert await d.remove_target(ALICE, "phone", APNS.token) is True
    assert await d.targets([ALICE]) == {ALICE: {"tablet": FCM}}
    assert await d.remove_target(ALICE, "phone", APNS.token) is False  # gone already
    assert await d.remove_target(ALICE, "tablet") is True  # without a token: whatever it is
    assert await d.targets([ALICE]) == {}
    assert await d.remove_target(ALICE, "tablet") is False
    # Re-registered with a new token: the report about the old one leaves it.
    await d.set_target(ALICE, "phone", APNS)
    await d.set_target(ALICE, "phone", PushTarget("apns", "apns-token-2", True))
    assert await d.remove_target(ALICE, "phone", APNS.token) is False
    assert (await d.targets([ALICE]))[ALICE]["phone"].token == "apns-token-2"


@pytest_twisted.ensureDeferred
async def test_the_cap_drops_the_oldest_registration(backend):
    d = store(backend)
    names = devices(MAX_TARGETS_PER_USER)
    await fill(backend, ALICE, names)
    await fill(backend, BOB, ["bob-phone"])
    assert list((await d.targets([ALICE]))[ALICE]) == names  # all kept up to the cap
    await d.set_target(ALICE, "new-1", APNS)
    got = (await d.targets([ALICE]))[ALICE]
    assert len(got) == MAX_TARGETS_PER_USER and "d00" not in got and got["new-1"] == APNS
    # Re-registering renews the registration and drops nothing; d01 is the oldest now...
    backend.advance(1)
    await d.set_target(ALICE, "d01", FCM)
    assert len((await d.targets([ALICE]))[ALICE]) == MAX_TARGETS_PER_USER
    # ... so d02 goes next, then d03.
    backend.advance(1)
    await d.set_target(ALICE, "new-2", APNS)
    got = (await d.targets([ALICE]))[ALICE]
    assert "d02" not in got and got["d01"] == FCM and "new-2" in got
    await d.set_target(ALICE, "new-3", APNS)
    assert set((await d.targets([ALICE]))[ALICE]) == {*names[4:], "d01", "new-1", "new-2", "new-3"}
    assert await d.targets([BOB]) == {BOB: {"bob-phone": PushTarget("fcm", "tok-bob-phone", False)}}


@pytest_twisted.ensureDeferred
async def test_equal_registration_times_drop_the_lowest_device_id(backend):
    """Ties go by device id as UTF-8 bytes ("z" < "é"), whatever the order of registering."""
    d = store(backend)
    names = [f"é{i:02}" for i in range(MAX_TARGETS_PER_USER - 3)] + ["z", "b", "a\u0301"]
    await fill(backend, ALICE, names, step_ms=0)
    await d.set_target(ALICE, "new", APNS)
    got = (await d.targets([ALICE]))[ALICE]
    assert "a\u0301" not in got and {"z", "b", "new"} <= set(got)
    await d.set_target(ALICE, "new2", APNS)
    await d.set_target(ALICE, "new3", APNS)
    got = (await d.targets([ALICE]))[ALICE]
    assert not {"b", "new"} & set(got)  # "b", then "new" (lower than "z" and the "é"s)
    assert {"z", "new2", "new3"} <= set(got) and len(got) == MAX_TARGETS_PER_USER


@pytest_twisted.ensureDeferred
async def test_a_new_registration_is_kept_when_the_clock_stepped_back(backend):
    d = store(backend)
    await fill(backend, ALICE, devices(MAX_TARGETS_PER_USER))
    backend.advance(-1_000_000)  # earlier than every registration
    await d.set_target(ALICE, "late", APNS)
    got = (await d.targets([ALICE]))[ALICE]
    assert got["late"] == APNS and "d00" not in got and len(got) == MAX_TARGETS_PER_USER
    # It is the oldest now: the next new device drops it.
    await d.set_target(ALICE, "later", APNS)
    got = (await d.targets([ALICE]))[ALICE]
    assert "late" not in got and "d01" in got and "later" in got


@pytest_twisted.ensureDeferred
async def test_targets_of_many_users_at_once(backend):
    d = store(backend)
    users = [*range(1, 301), HIGH - 1, HIGH, HIGH + 1, U64_MAX]
    expected = {}
    for i, user in enumerate(users):
        if i % 3 == 0 or user >= HIGH - 1:
            target = PushTarget("apns" if i % 2 else "fcm", f"token-{user}", bool(i % 4))
            await d.set_target(user, "phone", target)
            await d.set_target(user, "desk", FCM)
            expected[user] = {"desk": FCM, "phone": target}
    asked = [U64_MAX, 7, *reversed(users), 10**6, 7, HIGH]  # unknown users and duplicates
    got = await d.targets(asked)
    assert got == expected
    assert list(got) == sorted(expected)  # users ascending (as u64)
    assert all(list(per_device) == ["desk", "phone"] for per_device in got.values())
    assert await d.targets([2, 3, 10**6]) == {}
    assert await d.targets([HIGH]) == {HIGH: expected[HIGH]}


@pytest_twisted.ensureDeferred
async def test_u64_user_ids(backend):
    d = store(backend)
    for user in (HIGH - 1, HIGH, U64_MAX):
        await d.set_target(user, "phone", PushTarget("fcm", f"t{user}", True))
        await d.revoke(user, user % 1000 + 1)
    assert await d.targets([U64_MAX, HIGH, HIGH - 1]) == {
        u: {"phone": PushTarget("fcm", f"t{u}", True)} for u in (HIGH - 1, HIGH, U64_MAX)
    }
    assert [await d.revoked_before(u) for u in (HIGH - 1, HIGH, U64_MAX)] == [
        u % 1000 + 1 for u in (HIGH - 1, HIGH, U64_MAX)
    ]
    assert await d.remove_target(HIGH, "phone", f"t{HIGH}") is True
    assert sorted(await d.targets([HIGH - 1, HIGH, U64_MAX])) == [HIGH - 1, U64_MAX]


@pytest_twisted.ensureDeferred
async def test_non_ascii_device_ids_and_the_largest_tokens(backend):
    d = store(backend)
    device = ("téléphone-📱-" * 8).encode()[:MAX_DEVICE_ID].decode(errors="ignore")
    assert len(device.encode()) > MAX_DEVICE_ID - 4
    # 4096 UTF-8 bytes, multi-byte characters, and the bytes an encoding might split on.
    token = ("\x00:é日本" + "€" * 1500)[:1366]
    token += "x" * (MAX_PUSH_TOKEN - len(token.encode()))
    assert len(token.encode()) == MAX_PUSH_TOKEN
    big = PushTarget("apns.sandbox-2", token, preview=True)
    await d.set_target(ALICE, device, big)
    await d.set_target(ALICE, "日本", PushTarget("fcm", "é" * (MAX_PUSH_TOKEN // 2), False))
    got = await d.targets([ALICE])
    assert got == {ALICE: {device: big, "日本": PushTarget("fcm", "é" * 2048, False)}}
    assert list(got[ALICE]) == sorted([device, "日本"], key=str.encode)
    assert await d.remove_target(ALICE, device, token[:-1]) is False  # a prefix is not it
    assert await d.remove_target(ALICE, device, token) is True
    assert await d.targets([ALICE]) == {ALICE: {"日本": PushTarget("fcm", "é" * 2048, False)}}


@pytest_twisted.ensureDeferred
async def test_revocation_only_goes_forward(backend):
    d = store(backend)
    assert await d.revoked_before(ALICE) == 0
    await d.revoke(ALICE, 1_750_000_000_000)
    assert await d.revoked_before(ALICE) == 1_750_000_000_000
    await d.revoke(ALICE, 1_700_000_000_000)  # an earlier one changes nothing
    assert await d.revoked_before(ALICE) == 1_750_000_000_000
    await d.revoke(ALICE, 1_750_000_000_001)
    assert await d.revoked_before(ALICE) == 1_750_000_000_001
    assert await d.revoked_before(BOB) == 0
    await d.revoke(BOB, 0)  # revoking nothing
    assert await d.revoked_before(BOB) == 0
    await d.revoke(CAROL, 2**53)  # the largest time a store keeps exactly
    assert await d.revoked_before(CAROL) == 2**53


@pytest_twisted.ensureDeferred
async def test_everything_survives_a_restart(backend):
    d = store(backend)
    await fill(backend, ALICE, devices(MAX_TARGETS_PER_USER))
    await d.set_target(BOB, "phone", APNS)
    await d.set_target(HIGH, "日本", FCM)
    await d.revoke(ALICE, 1_760_000_000_000)
    await d.revoke(U64_MAX, 5)
    before = await d.targets([ALICE, BOB, HIGH])
    await backend.restart()
    d = store(backend)
    assert await d.targets([ALICE, BOB, HIGH]) == before
    assert [await d.revoked_before(u) for u in (ALICE, U64_MAX, BOB)] == [1_760_000_000_000, 5, 0]
    await d.revoke(ALICE, 1)
    assert await d.revoked_before(ALICE) == 1_760_000_000_000
    # The registration times were kept: the cap still drops the oldest.
    await d.set_target(ALICE, "new", APNS)
    got = (await d.targets([ALICE]))[ALICE]
    assert "d00" not in got and "d01" in got and got["new"] == APNS
