"""Every sample payload of the reference documents parses into the typed models.

The samples below are copied verbatim from /work/shared/reference (filex-transfer-methods.txt and
finra-api-platform-and-fip-oauth.txt), only dedented and with trailing blanks removed.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
from pydantic import TypeAdapter

from filex_agent.models import (
    Listing,
    PresignedUrl,
    S3Credentials,
    S3TransferTokens,
    TokenResponse,
    TrackingRecord,
)

S3_TRANSFER_TOKENS = r'''{
  "region": "us-east-1",
  "sessionName": "filexuser7777@26592f93-f124-4d9a-a6ed-eefc3c9dba01",
  "readPaths": [
    "1422-4800-0760-filex-qa-int/7777/app1/in_arcv/",
    "1422-4800-0760-filex-qa-int/7777/app1/out/"
  ],
  "writePaths": [
    "1422-4800-0760-filex-qa-int/7777/app1/in/"
  ],
  "credentials": {
    "accessKeyId": "ASIAST4OK6N2C5M",
    "secretAccessKey": "UjJ968D0V4lzIN65FfnlKUqFdBig2va0Cr",
    "sessionToken": "FwoGZXIvYXdzENb//////////wEaDB2zD7M442u66VFVVSK0FbhMz2DWa0HHkLxEH+uKHQg22mTJzOxhCE8zEv3tUnF1wzGWL5I//zVch7abvQR6ivLw12bGTyckLADiMOEkLNDOBzAlaaSWTaGiS0A8k5RKsDelUsH4rtyducNcJRRGAzjnRII+HWOc1LyulULlAz2tO44YDKmOWOGjdnPr2xljOLTx
PgwaVzNNM8NTcdCGNepWICl3r2A1UUESbzWrG6RCNyhU9vyxt4PJiRyRhHj6pQ4I++GVUvEhmyfiH4HbTo39x5uteFZw2Utn0jDp6TPHF8CvZmUf9a9Ygxo58axzJbDlBoFr0o2Y44TCHisYaewJfSptEdkPyQGIqFi1v1",
    "expiration": "2025-08-22T17:29:58.000-04:00"
  }
}'''

APPLICATIONS = r'''{
  "name": "0001",
  "type": "DIR",
  "metadata": {
    "writable": false
  },
  "children": [

    {
      "name": "testDIR1",
      "type": "DIR",
      "metadata": {
        "writable": false
      }
    },

    {
      "name": "testDIR2",
      "type": "DIR",
      "metadata": {
        "writable": false
      }
    }
  ],
  "_links": {
    "self": [
      {
        "href": "https://filex.finra.org/files/0001"
      }
    ],
    "parent": [
      {
        "href": "https://filex.finra.org/files"
      }
    ],
    "children": [
      {
        "href": "https://filex.finra.org/files/0001/testDIR1"
      },
      {
        "href": "https://filex.finra.org/files/0001/testDIR2"
      }
    ]
  }
}'''

SUBSPACES = r'''{
  "name": "app1",
  "type": "DIR",
  "metadata": {
    "writable": false
  },
  "children": [
    {
      "name": "out",
      "type": "DIR",
      "metadata": {
        "writable": false
      }
    },
    {
      "name": "in",
      "type": "DIR",
      "metadata": {
        "writable": true
      }
    },
    {
      "name": "in_arcv",
      "type": "DIR",
      "metadata": {
        "writable": false
      }
    }
  ],
  "_links": {
    "self": [
      {
        "href": "https://filex.finra.org/files/0001/app1"
      }
    ],
    "parent": [
      {
        "href": "https://filex.finra.org/files/0001"
      }
    ],
    "children": [
      {
        "href": "https://filex.finra.org/files/0001/app1/out"
      },
      {
        "href": "https://filex.finra.org/files/0001/app1/in"
      },
      {
        "href": "https://filex.finra.org/files/0001/app1/in_arcv"
      }
    ]
  }
}'''

OUT_LISTING = r'''{
  "name": "out",
  "type": "DIR",
  "metadata": {
    "writable": false
  },
  "children": [

    {
      "name": "Testfile.txt",
      "type": "FILE",
      "metadata": {
        "writable": false,
        "contentLength": 130766,
        "lastModified": "2025-08-04T07:30:34.000-04:00"
      }
    },
    {
      "name": "Testfile2.txt",
      "type": "FILE",
      "metadata": {
        "writable": false,
        "contentLength": 130766,
        "lastModified": "2025-08-05T07:29:18.000-04:00"
      }
    }
  ],
  "_links": {
    "self": [
      {
        "href": "https://filex.finra.org/files/0001/app1/out"
      }
    ],
    "parent": [
      {
        "href": "https://filex.finra.org/files/0001/app1"
      }
    ],
    "children": [
      {
        "href": "https://filex.finra.org/files/0001/app1/out/Testfile.txt"
      },
      {
        "href": "https://filex.finra.org/files/0001/app1/out/Testfile2.txt"
      }
    ]
  }
}'''

DOWNLOAD_URL = r'''{
  "url": "https://1422-4800-0760-filex-qa-int.s3.amazonaws.com/79/fileX/out/0AcREpi4FR-AtestVerboseRegexWithLette-1%2FX-Amz-Expires=60&X-Amz-SignedHeaders=host&X-Amz-Security-Token=FwoGZXIvYXdzEOX%2F%2F%2F%2F%2F%2F%2F%2F%2F%2FwEaDA3fRJlRsgYWKxgu5yLUAT3YUGSbtHh1G93w0BDuYQvcImXpEP7gu51a6088df6764d73fc5cd9b",
  "expirationTime": "2025-08-23T07:53:34.620-04:00"
}'''

UPLOAD_URL = r'''{
  "url": "https://1422-4800-0760-filex-qa-int.s3.amazonaws.com/79/fZizZcf3%2BYYI%2FuZrapUY%2F5Z%24lqsfOn4%2Bbkj4buGKefeI5IZ0Ew78bh6i7I7gOD9FA7qM2j1ZB%2FSsIkfJnHjfGL1beC8x%2FM3Vu9XpiTOKpemHXdlK9kyep%2FrsPwmFKK6Wp8UGMi1L%2F4BkKr1jLBLX268iYeGXlO2IUgIARg05d9jmRJ9%2BLviuLtAROJfTESifFCw%3D&X-Amz-Signature=7e5b6c1b156c83ff22492855acc714bdd981b34b775dfe07e08ad846d61358b5",
  "expirationTime": "2025-08-23T10:08:42.244-04:00",
  "trackingId": "d3caf6d8-34a4-4b83-9b63-b20dc055286"
}'''

TRACKING = r'''[
  {
    "trackingId": "55390700-bfeb-4c88-9015-bff97ec83e00",
    "submissionTime": null,
    "userName": "filexuser79",
    "fileName": "testfile.txt",
    "status": "Request Received",
    "downstreamStatus": null,
    "statusUpdatedTime": "2025-11-20T21:02:47.428-05:00",
    "fileSize": 0,
    "uploadLocation": "79/fileX/in",
    "applicationName": "fileX",
    "applicationSpaceName": "in",
    "arcvFileName": null,
    "downloadable": false,
    "_links": [
      {
        "rel": "self",
        "href": "https://filex-int.qa.finra.org/tracking?id=55390700-bfeb-4c88-9015-bff97ec83e00"
      },
      {
        "rel": "parent",
        "href": "https://filex-int.qa.finra.org/tracking"
      }
    ]
  }
]'''

FIP_TOKEN = r'''{
    "access_token": "*AAJTSQACMDIABHR5cGUAA0pXVAACUzEAAjAx*eyJ0eXAiOiJKV1QiLCJjdHkiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.ZXlKMGVYQWlPaU pLVjFRaUxDSmxibU1pT2lKQk1USTRRMEpETFVoVE1qVTJJaXdpWVd4bklqb2laR2x5SW4wLi56RlNXS09XZklKX1FJT3htWEZtalpB LjF4LVVCMF9OdG85WmhkZlRvTW10dXNNZkxGMUN6MS0tVVVKYTYzYXBwdm8xWExVYzRLXy1raUVEOHFpRXpLZU14aUtLWDc1eTRwcVc4eVlDMs",
    "scope": "any",
    "token_type": "Bearer",
    "expires_in":"43170"
}'''

EDT = timezone(timedelta(hours=-4))
EST = timezone(timedelta(hours=-5))


def _s3_sample() -> dict:
    # The web page wraps the long sessionToken onto a second line, which is not valid JSON;
    # rejoin it (the only change) to get the payload the service actually sends.
    with pytest.raises(json.JSONDecodeError):
        json.loads(S3_TRANSFER_TOKENS)
    return json.loads(S3_TRANSFER_TOKENS.replace("OLTx\nPgwa", "OLTxPgwa"))


def test_applications_listing() -> None:
    listing = Listing.model_validate_json(APPLICATIONS)
    assert listing.name == "0001"
    assert listing.type == "DIR"
    assert listing.metadata.writable is False
    assert [c.name for c in listing.children] == ["testDIR1", "testDIR2"]
    assert not any(c.is_file for c in listing.children)
    assert [(link.rel, link.href) for link in listing.links] == [
        ("self", "https://filex.finra.org/files/0001"),
        ("parent", "https://filex.finra.org/files"),
        ("children", "https://filex.finra.org/files/0001/testDIR1"),
        ("children", "https://filex.finra.org/files/0001/testDIR2"),
    ]


def test_subspaces_listing() -> None:
    listing = Listing.model_validate_json(SUBSPACES)
    assert listing.name == "app1"
    assert {c.name: c.metadata.writable for c in listing.children} == {"out": False, "in": True, "in_arcv": False}
    assert len([link for link in listing.links if link.rel == "children"]) == 3


def test_out_file_listing() -> None:
    listing = Listing.model_validate_json(OUT_LISTING)
    files = [c for c in listing.children if c.is_file]
    assert [f.name for f in files] == ["Testfile.txt", "Testfile2.txt"]
    assert files[0].metadata.contentLength == 130766
    assert files[0].metadata.lastModified == datetime(2025, 8, 4, 7, 30, 34, tzinfo=EDT)
    assert files[1].metadata.lastModified == datetime(2025, 8, 5, 7, 29, 18, tzinfo=EDT)
    assert listing.links[0].href == "https://filex.finra.org/files/0001/app1/out"


def test_download_presigned_url() -> None:
    p = PresignedUrl.model_validate_json(DOWNLOAD_URL)
    assert p.url.startswith("https://1422-4800-0760-filex-qa-int.s3.amazonaws.com/79/fileX/out/")
    assert p.expirationTime == datetime(2025, 8, 23, 7, 53, 34, 620000, tzinfo=EDT)
    assert p.trackingId is None


def test_upload_presigned_url_with_tracking_id() -> None:
    p = PresignedUrl.model_validate_json(UPLOAD_URL)
    assert p.trackingId == "d3caf6d8-34a4-4b83-9b63-b20dc055286"
    assert p.expirationTime == datetime(2025, 8, 23, 10, 8, 42, 244000, tzinfo=EDT)
    assert "X-Amz-Signature=7e5b6c1b" in p.url


def test_tracking_list_with_nulls_and_list_links() -> None:
    records = TypeAdapter(list[TrackingRecord]).validate_json(TRACKING)
    assert len(records) == 1
    r = records[0]
    assert r.trackingId == "55390700-bfeb-4c88-9015-bff97ec83e00"
    assert r.submissionTime is None
    assert r.downstreamStatus is None
    assert r.arcvFileName is None
    assert r.status == "Request Received"
    assert r.statusUpdatedTime == datetime(2025, 11, 20, 21, 2, 47, 428000, tzinfo=EST)
    assert r.fileSize == 0
    assert r.uploadLocation == "79/fileX/in"
    assert r.applicationName == "fileX"
    assert r.applicationSpaceName == "in"
    assert r.downloadable is False
    assert not r.is_final
    assert [(link.rel, link.href) for link in r.links] == [
        ("self", "https://filex-int.qa.finra.org/tracking?id=55390700-bfeb-4c88-9015-bff97ec83e00"),
        ("parent", "https://filex-int.qa.finra.org/tracking"),
    ]


def test_s3_transfer_tokens() -> None:
    t = S3TransferTokens.model_validate(_s3_sample())
    assert t.region == "us-east-1"
    assert t.sessionName == "filexuser7777@26592f93-f124-4d9a-a6ed-eefc3c9dba01"
    assert t.writePaths == ["1422-4800-0760-filex-qa-int/7777/app1/in/"]
    assert t.readPaths[1] == "1422-4800-0760-filex-qa-int/7777/app1/out/"
    assert t.credentials.accessKeyId == "ASIAST4OK6N2C5M"
    assert t.credentials.secretAccessKey == "UjJ968D0V4lzIN65FfnlKUqFdBig2va0Cr"
    assert t.credentials.sessionToken.startswith("FwoGZXIvYXdzENb") and t.credentials.sessionToken.endswith("GIqFi1v1")
    assert "\n" not in t.credentials.sessionToken
    assert t.credentials.expiration == datetime(2025, 8, 22, 17, 29, 58, tzinfo=EDT)


def test_fip_token_expires_in_is_a_string() -> None:
    tok = TokenResponse.model_validate_json(FIP_TOKEN)
    assert json.loads(FIP_TOKEN)["expires_in"] == "43170"
    assert tok.expires_in == 43170
    assert tok.token_type == "Bearer"
    assert tok.scope == "any"
    assert tok.access_token.startswith("*AAJTSQACMDIABHR5cGUAA0pXVAACUzEAAjAx*eyJ0eXAi")


def test_tracking_alternative_field_names_from_the_table() -> None:
    r = TrackingRecord.model_validate(
        {"trackingId": "t1", "application": "focus", "applicationSpace": "in", "downstreamStatus": "ACCEPTED"})
    assert r.applicationName == "focus"
    assert r.applicationSpaceName == "in"
    assert r.is_final


def test_links_in_both_shapes() -> None:
    as_object = {"self": [{"href": "https://x/files/1"}], "parent": {"href": "https://x/files"}}
    as_list = [{"rel": "self", "href": "https://x/files/1"}, {"rel": "parent", "href": "https://x/files"}]
    expected = [("self", "https://x/files/1"), ("parent", "https://x/files")]
    for links in (as_object, as_list):
        listing = Listing.model_validate({"name": "1", "_links": links})
        record = TrackingRecord.model_validate({"trackingId": "t", "_links": links})
        assert [(x.rel, x.href) for x in listing.links] == expected
        assert [(x.rel, x.href) for x in record.links] == expected
    assert Listing.model_validate({"name": "1", "_links": None, "children": None}).children == []


def test_unknown_fields_are_ignored() -> None:
    data = json.loads(OUT_LISTING)
    data["newTopLevel"] = {"x": 1}
    data["children"][0]["metadata"]["checksum"] = "abc"
    listing = Listing.model_validate(data)
    assert listing.children[0].metadata.contentLength == 130766
    rec = json.loads(TRACKING)[0] | {"priority": "high"}
    assert TrackingRecord.model_validate(rec).trackingId == "55390700-bfeb-4c88-9015-bff97ec83e00"
    tok = json.loads(FIP_TOKEN) | {"refresh_token": None, "id_token": "x"}
    assert TokenResponse.model_validate(tok).expires_in == 43170


def test_repr_shows_no_secret() -> None:
    tok = TokenResponse.model_validate_json(FIP_TOKEN)
    creds = S3TransferTokens.model_validate(_s3_sample()).credentials
    up = PresignedUrl.model_validate_json(UPLOAD_URL)
    down = PresignedUrl.model_validate_json(DOWNLOAD_URL)
    assert isinstance(creds, S3Credentials)
    for obj, secrets in (
        (tok, [tok.access_token, "AAJTSQACMDIA"]),
        (creds, [creds.secretAccessKey, creds.sessionToken[:20]]),
        (up, ["X-Amz-Signature", "7e5b6c1b156c83ff", up.url]),
        (down, ["X-Amz-Security-Token", down.url]),
    ):
        for text in (repr(obj), str(obj)):
            for secret in secrets:
                assert secret not in text, (type(obj).__name__, secret)
    assert "ASIAST4OK6N2C5M" in repr(creds)  # the key id is not a secret; shows it is the same object
    assert "d3caf6d8" in repr(up)
