"""Models of the password reset endpoints."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from web.schemas.accounts import Email, Password
from web.schemas.base import RequestModel


class ForgotRequest(RequestModel):
    email: Email


class ResetRequested(BaseModel):
    """The same answer whether or not the address has an account."""

    accepted: Literal[True] = True


class ResetRequest(RequestModel):
    token: str = Field(
        min_length=16, max_length=200, description="From the emailed link."
    )
    password: Password
