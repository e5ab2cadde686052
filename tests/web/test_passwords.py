"""The password scheme: NFKC + keyed HMAC pre-hash + bcrypt, off the event loop."""

from __future__ import annotations

import threading
import unicodedata

import bcrypt
import pytest

from web.passwords import (
    SCHEME_V1,
    hash_password,
    needs_rehash,
    prehash,
    verify_password,
    verify_unknown,
)

KEY = "test-secret-key"


async def test_hash_is_versioned_bcrypt_of_the_prehash() -> None:
    stored = await hash_password("hunter2-hunter2", secret_key=KEY, rounds=4)
    assert stored.startswith(SCHEME_V1 + "$2b$04$")
    assert len(stored) <= 128  # the column's size
    inner = stored.removeprefix(SCHEME_V1).encode()
    assert bcrypt.checkpw(prehash("hunter2-hunter2", KEY), inner)
    # Salted: the same password hashes differently each time.
    assert stored != await hash_password("hunter2-hunter2", secret_key=KEY, rounds=4)


async def test_verify_accepts_the_password_and_nothing_else() -> None:
    stored = await hash_password("correct horse", secret_key=KEY, rounds=4)
    assert await verify_password("correct horse", stored, secret_key=KEY)
    assert not await verify_password("correct horsE", stored, secret_key=KEY)
    assert not await verify_password("", stored, secret_key=KEY)
    # The pre-hash is keyed: a database copied to another deployment (another
    # secret key) does not verify, and offline guessing needs the key too.
    assert not await verify_password("correct horse", stored, secret_key="other")


async def test_passwords_over_72_bytes_are_not_truncated() -> None:
    long = "p" * 72 + "-first"
    same_start = "p" * 72 + "-second"
    stored = await hash_password(long, secret_key=KEY, rounds=4)
    assert await verify_password(long, stored, secret_key=KEY)
    assert not await verify_password(same_start, stored, secret_key=KEY)
    # What bcrypt sees is 44 ASCII bytes whatever the length, never a NUL.
    for password in (long, "x" * 256, "日本語" * 80):
        seen = prehash(password, KEY)
        assert len(seen) == 44
        assert b"\0" not in seen


async def test_unicode_forms_of_one_password_are_equal() -> None:
    composed = unicodedata.normalize("NFC", "Ångström café naïve")
    decomposed = unicodedata.normalize("NFD", composed)
    assert composed != decomposed
    stored = await hash_password(composed, secret_key=KEY, rounds=4)
    assert await verify_password(decomposed, stored, secret_key=KEY)
    # NFKC also folds compatibility forms (full-width letters and digits).
    full_width = "".join(chr(ord(char) + 0xFEE0) for char in "ABC123")
    assert prehash(full_width, KEY) == prehash("ABC123", KEY)
    assert prehash("Ångström", KEY) != prehash("Angstrom", KEY)


@pytest.mark.parametrize(
    "stored",
    [
        "$2b$04$CUvZYCHdgBvTJuSVhyyqWu.8ka7PXCsp2JbeytOyWhhzSJ9FFBdYm",  # no prefix
        SCHEME_V1 + "not-a-bcrypt-hash",
        "sdapi9$whatever",
        "",
    ],
)
async def test_unknown_or_broken_hashes_never_verify(stored: str) -> None:
    assert not await verify_password("anything-at-all", stored, secret_key=KEY)


async def test_needs_rehash_when_the_cost_or_scheme_changes() -> None:
    stored = await hash_password("a password!", secret_key=KEY, rounds=4)
    assert not needs_rehash(stored, rounds=4)
    assert needs_rehash(stored, rounds=5)
    assert needs_rehash("$2b$04$whatever", rounds=4)


async def test_unknown_emails_cost_as_much_as_known_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rounds = 8
    stored = await hash_password("the real one", secret_key=KEY, rounds=rounds)
    # bcrypt's time is set by its cost, written in the salt or hash it is
    # given ("$2b$08$..."): counting the runs and reading their costs shows
    # what a stopwatch would, without the noise of a busy machine.
    runs: list[int] = []
    real_hashpw = bcrypt.hashpw
    real_checkpw = bcrypt.checkpw

    def hashpw(password: bytes, salt: bytes) -> bytes:
        runs.append(int(salt.split(b"$")[2]))
        return real_hashpw(password, salt)

    def checkpw(password: bytes, hashed: bytes) -> bool:
        runs.append(int(hashed.split(b"$")[2]))
        return real_checkpw(password, hashed)

    monkeypatch.setattr(bcrypt, "hashpw", hashpw)
    monkeypatch.setattr(bcrypt, "checkpw", checkpw)
    assert not await verify_password("a guess", stored, secret_key=KEY)
    known, runs[:] = list(runs), []
    assert not await verify_unknown("a guess", secret_key=KEY, rounds=rounds)
    # Both run one bcrypt at the same cost.
    assert known == runs == [rounds]


async def test_bcrypt_runs_in_a_worker_thread(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[int] = []
    real_hashpw = bcrypt.hashpw
    real_checkpw = bcrypt.checkpw

    def hashpw(password: bytes, salt: bytes) -> bytes:
        threads.append(threading.get_ident())
        return real_hashpw(password, salt)

    def checkpw(password: bytes, hashed: bytes) -> bool:
        threads.append(threading.get_ident())
        return real_checkpw(password, hashed)

    monkeypatch.setattr(bcrypt, "hashpw", hashpw)
    monkeypatch.setattr(bcrypt, "checkpw", checkpw)
    stored = await hash_password("off the loop!", secret_key=KEY, rounds=4)
    await verify_password("off the loop!", stored, secret_key=KEY)
    await verify_unknown("off the loop!", secret_key=KEY, rounds=4)
    loop_thread = threading.get_ident()
    assert len(threads) == 3
    assert loop_thread not in threads
