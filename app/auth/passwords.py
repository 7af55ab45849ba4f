"""Password hashing (argon2id) and the password policy.

Policy per OWASP ASVS 5.0: 8 to 256 characters, no composition rules, common passwords
refused. Hashing uses argon2id with 32 MiB, t=2, p=1: above OWASP's floor (19 MiB, t=2,
p=1) at about 50 ms a hash on one core, so a burst of logins cannot starve the server.
Hashes made with other parameters are upgraded at the next successful login.
"""

from __future__ import annotations

import functools
import threading
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

MIN_LENGTH = 8
MAX_LENGTH = 256

_hasher = PasswordHasher(time_cost=2, memory_cost=32 * 1024, parallelism=1)
# Each hash holds 32 MiB for tens of milliseconds; a burst of logins must not exhaust memory.
_argon2_slots = threading.BoundedSemaphore(4)


def _load_common_passwords() -> frozenset[str]:
    path = Path(__file__).with_name("common_passwords.txt")
    lines = path.read_text(encoding="utf-8").splitlines()
    return frozenset(
        line.strip().lower() for line in lines if line.strip() and not line.startswith("#")
    )


COMMON_PASSWORDS = _load_common_passwords()


class PasswordPolicyError(ValueError):
    """The password is unacceptable; the message says why in one line."""


def check_password_policy(password: str, *, username: str = "") -> None:
    if len(password) < MIN_LENGTH:
        raise PasswordPolicyError(f"Password must be at least {MIN_LENGTH} characters.")
    if len(password) > MAX_LENGTH:
        raise PasswordPolicyError(f"Password must be at most {MAX_LENGTH} characters.")
    lowered = password.lower()
    if lowered in COMMON_PASSWORDS:
        raise PasswordPolicyError("That password is too common; choose another.")
    if username and lowered == username.lower():
        raise PasswordPolicyError("Password must not be the username.")


def hash_password(password: str) -> str:
    with _argon2_slots:
        return _hasher.hash(password)


def verify_password(password_hash: str, password: str) -> bool:
    with _argon2_slots:
        try:
            return _hasher.verify(password_hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False


def needs_rehash(password_hash: str) -> bool:
    return _hasher.check_needs_rehash(password_hash)


@functools.cache
def _dummy_hash() -> str:
    return hash_password("prefloop-timing-equaliser")


def burn_verification_time(password: str) -> None:
    """Verify against a throwaway hash, so a login for an unknown account takes as long as
    one for a real account and does not reveal which usernames exist."""
    verify_password(_dummy_hash(), password)
