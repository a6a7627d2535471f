"""Typed models of fileX / FIP payloads.

Parsed tolerantly: the reference documents disagree with themselves (``application`` vs
``applicationName``, ``_links`` as a list of ``{rel, href}`` in tracking and as an object of lists
in listings, ``expires_in`` as a string), and unknown fields are ignored so that a new field from
FINRA does not stop the agent.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator

FINAL_DOWNSTREAM = ("ACCEPTED", "REJECTED", "PARTIALLY_REJECTED")


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)


class Link(_Model):
    rel: str | None = None
    href: str


def _parse_links(value: Any) -> list[Link]:
    """Accept ``[{rel, href}]`` (tracking) or ``{rel: [{href}]}`` (listings)."""
    if value is None:
        return []
    if isinstance(value, list):
        return [Link.model_validate(v) for v in value if isinstance(v, dict) and "href" in v]
    if isinstance(value, dict):
        out: list[Link] = []
        for rel, items in value.items():
            if isinstance(items, dict):
                items = [items]
            for item in items or []:
                if isinstance(item, dict) and "href" in item:
                    out.append(Link(rel=item.get("rel", rel), href=item["href"]))
        return out
    raise ValueError("_links must be a list or an object")


class TokenResponse(_Model):
    access_token: str = Field(repr=False)
    token_type: str = "Bearer"
    scope: str | None = None
    # FIP sends a string of seconds ("43170"); accept a number too.
    expires_in: int = 1800

    @field_validator("expires_in", mode="before")
    @classmethod
    def _seconds(cls, v: Any) -> int:
        if v is None or v == "":
            return 1800
        return int(str(v).strip())


class EntryMetadata(_Model):
    writable: bool = False
    contentLength: int | None = None
    lastModified: datetime | None = None


class Entry(_Model):
    name: str
    type: str = "DIR"
    metadata: EntryMetadata = EntryMetadata()

    @property
    def is_file(self) -> bool:
        return self.type.upper() == "FILE"


class Listing(_Model):
    """``GET /files/{org}[/{app}[/{sub}]]``."""

    name: str
    type: str = "DIR"
    metadata: EntryMetadata = EntryMetadata()
    children: list[Entry] = []
    links: list[Link] = Field(default=[], validation_alias=AliasChoices("_links", "links"))

    @field_validator("children", mode="before")
    @classmethod
    def _children(cls, v: Any) -> Any:
        return [] if v is None else v

    @field_validator("links", mode="before")
    @classmethod
    def _links(cls, v: Any) -> list[Link]:
        return _parse_links(v)


class PresignedUrl(_Model):
    """``GET``/``PUT /files/{org}/{app}/{sub}/{file}``; ``trackingId`` only on PUT."""

    url: str = Field(repr=False)
    expirationTime: datetime | None = None
    trackingId: str | None = None


class TrackingRecord(_Model):
    trackingId: str
    submissionTime: datetime | None = None
    userName: str | None = None
    fileName: str | None = None
    status: str | None = None
    downstreamStatus: str | None = None
    statusUpdatedTime: datetime | None = None
    fileSize: int | None = None
    uploadLocation: str | None = None
    applicationName: str | None = Field(
        default=None, validation_alias=AliasChoices("applicationName", "application")
    )
    applicationSpaceName: str | None = Field(
        default=None, validation_alias=AliasChoices("applicationSpaceName", "applicationSpace")
    )
    arcvFileName: str | None = None
    downloadable: bool | None = None
    links: list[Link] = Field(default=[], validation_alias=AliasChoices("_links", "links"))

    @field_validator("links", mode="before")
    @classmethod
    def _links(cls, v: Any) -> list[Link]:
        return _parse_links(v)

    @property
    def is_final(self) -> bool:
        return (self.downstreamStatus or "").upper() in FINAL_DOWNSTREAM


class S3Credentials(_Model):
    accessKeyId: str
    secretAccessKey: str = Field(repr=False)
    sessionToken: str = Field(repr=False)
    expiration: datetime


class S3TransferTokens(_Model):
    """``GET /S3TransferTokens/{org}/{app}``: paths are ``bucket/org/app/sub/``, bucket first."""

    region: str = "us-east-1"
    sessionName: str | None = None
    readPaths: list[str] = []
    writePaths: list[str] = []
    credentials: S3Credentials
