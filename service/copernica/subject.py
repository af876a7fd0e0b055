"""Whom a Copernica data request is about: an e-mail address, a profile or a subprofile."""

from __future__ import annotations

from dataclasses import dataclass

SUBJECT_TYPES = ("email", "profile", "subprofile")


@dataclass(frozen=True)
class Subject:
    """Whom a data request is about: type email/profile/subprofile and the address or id."""

    type: str
    id: str
