"""The GeoReport v2 wire format (http://wiki.open311.org/GeoReport_v2): service definitions,
a service request parsed from its form (attributes checked against the definition), errors as
``[{code, description}]``, and the JSON/XML rendering of every answer. No HTTP, no gateway:
``open311.py`` is the adapter that serves it."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal
from xml.sax.saxutils import escape

from gateway.contact.clock import Micros, format_time
from gateway.records import clean_text

SPEC_URL: Final = "http://wiki.open311.org/GeoReport_v2"
FORMATS: Final = ("application/json", "text/xml")
_ATTRIBUTE: Final = re.compile(r"^attribute\[([^\[\]]{1,64})\](\[\])?$")
_FIELDS: Final = frozenset(
    {
        "api_key",
        "jurisdiction_id",
        "service_code",
        "lat",
        "long",
        "address_string",
        "address_id",
        "email",
        "device_id",
        "account_id",
        "first_name",
        "last_name",
        "phone",
        "description",
        "media_url",
        "media",
    }
)
CONTACT_ID: Final = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
_LIMITS: Final = {"description": 8000, "address_string": 1024, "media_url": 2048}
MAX_FORM: Final = 64 * 1024


Datatype = Literal["string", "number", "datetime", "text", "singlevaluelist", "multivaluelist"]


@dataclass(frozen=True, slots=True)
class Open311Attribute:
    """One attribute of a service definition (GeoReport v2 ``services/{code}``)."""

    code: str
    description: str = ""
    datatype: Datatype = "string"
    required: bool = False
    variable: bool = True
    order: int = 0
    datatype_description: str = ""
    values: dict[str, str] = field(default_factory=dict)
    """For list datatypes: key -> name."""


@dataclass(frozen=True, slots=True)
class Open311Service:
    """One service (GeoReport v2 ``services``); the table key is its ``service_code``."""

    name: str
    description: str = ""
    group: str = ""
    keywords: tuple[str, ...] = ()
    type: Literal["realtime", "batch", "blackbox"] = "realtime"
    attributes: tuple[Open311Attribute, ...] = ()


class Open311Error(Exception):
    """An error the spec reports as ``[{code, description}]`` with that HTTP status."""

    def __init__(self, status: int, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.description = description


# ---------------------------------------------------------------- rendering


def to_xml(root: str, item: str, rows: Sequence[Mapping[str, Any]]) -> str:
    """Render rows as the spec's XML: ``<root><item><field>v</field>...</item></root>``."""
    out = ['<?xml version="1.0" encoding="utf-8"?>', f"<{root}>"]
    for row in rows:
        out.append(f"<{item}>{xml_fields(row)}</{item}>")
    out.append(f"</{root}>")
    return "".join(out)


_PLURALS: Final = {
    "attributes": "attribute",
    "values": "value",
    "endpoints": "endpoint",
    "formats": "format",
    "keywords": "keyword",
}


def xml_fields(row: Mapping[str, Any]) -> str:
    parts = []
    for key, value in row.items():
        if isinstance(value, Mapping):
            parts.append(f"<{key}>{xml_fields(value)}</{key}>")
        elif isinstance(value, (list, tuple)):
            child = _PLURALS.get(key, "item")
            inner = "".join(
                f"<{child}>{xml_fields(v)}</{child}>"
                if isinstance(v, Mapping)
                else f"<{child}>{_xml_value(v)}</{child}>"
                for v in value
            )
            parts.append(f"<{key}>{inner}</{key}>")
        else:
            parts.append(f"<{key}>{_xml_value(value)}</{key}>")
    return "".join(parts)


def _xml_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return escape(str(value))


def iso_time(us: Micros) -> str:
    """ISO 8601 with offset, as the spec's examples write datetimes."""
    return format_time(us).split(".")[0] + "Z"


# ---------------------------------------------------------------- parsing a request


@dataclass(frozen=True, slots=True)
class ServiceRequest:
    """A validated ``POST requests`` body."""

    service_code: str
    lat: float | None
    long: float | None
    address_string: str
    address_id: str
    description: str
    media_url: str
    email: str
    phone: str
    first_name: str
    last_name: str
    device_id: str
    account_id: str
    attributes: dict[str, str | list[str]]


def parse_request(
    form: Mapping[str, str | list[str]], services: Mapping[str, Open311Service]
) -> ServiceRequest:
    """Validate a service request as GeoReport v2 defines it; raise Open311Error."""
    plain: dict[str, str] = {}
    attributes: dict[str, str | list[str]] = {}
    for key, value in form.items():
        m = _ATTRIBUTE.match(key)
        if m:
            values = value if isinstance(value, list) else [value]
            if m.group(2) or len(values) != 1:
                attributes[m.group(1)] = [v[:1024] for v in values]
            else:
                attributes[m.group(1)] = values[0][:1024]
            continue
        if key not in _FIELDS:
            raise Open311Error(400, f"unknown parameter: {key[:64]}")
        if isinstance(value, list):
            if len(value) > 1:
                raise Open311Error(400, f"{key} given more than once")
            text = value[0] if value else ""
        else:
            text = value
        limit = _LIMITS.get(key, 256)
        if len(text) > limit:
            raise Open311Error(400, f"{key}: longer than {limit} characters")
        plain[key] = clean_text(text).strip()
    code = plain.get("service_code", "")
    if not code:
        raise Open311Error(400, "service_code is required")
    service = services.get(code)
    if service is None:
        raise Open311Error(404, f"service_code not found: {code[:64]}")
    lat = _coordinate(plain.get("lat"), "lat", 90.0)
    long = _coordinate(plain.get("long"), "long", 180.0)
    if (lat is None) != (long is None):
        raise Open311Error(400, "lat and long go together")
    if lat is None and not plain.get("address_string") and not plain.get("address_id"):
        raise Open311Error(
            400, "a location is required: lat and long, address_string or address_id"
        )
    _check_attributes(service, attributes)
    return ServiceRequest(
        service_code=code,
        lat=lat,
        long=long,
        address_string=plain.get("address_string", ""),
        address_id=plain.get("address_id", ""),
        description=plain.get("description", ""),
        media_url=plain.get("media_url", ""),
        email=plain.get("email", ""),
        phone=plain.get("phone", ""),
        first_name=plain.get("first_name", ""),
        last_name=plain.get("last_name", ""),
        device_id=plain.get("device_id", ""),
        account_id=plain.get("account_id", ""),
        attributes=attributes,
    )


def _coordinate(raw: str | None, name: str, bound: float) -> float | None:
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        raise Open311Error(400, f"{name}: not a number") from None
    if not math.isfinite(value) or abs(value) > bound:
        raise Open311Error(400, f"{name}: out of range")
    return value


def _check_attributes(service: Open311Service, given: Mapping[str, str | list[str]]) -> None:
    defined = {a.code: a for a in service.attributes}
    for code in given:
        if code not in defined:
            raise Open311Error(400, f"attribute[{code[:64]}] is not defined for this service")
    for attr in service.attributes:
        value = given.get(attr.code)
        if value is None or value == "" or value == []:
            if attr.required and attr.variable:
                raise Open311Error(400, f"attribute[{attr.code}] is required")
            continue
        values = value if isinstance(value, list) else [value]
        if attr.datatype in ("singlevaluelist", "multivaluelist"):
            if attr.datatype == "singlevaluelist" and len(values) > 1:
                raise Open311Error(400, f"attribute[{attr.code}] takes one value")
            for v in values:
                if v not in attr.values:
                    raise Open311Error(400, f"attribute[{attr.code}]: {v[:64]!r} is not a choice")
        elif attr.datatype == "number":
            for v in values:
                try:
                    float(v)
                except ValueError:
                    raise Open311Error(400, f"attribute[{attr.code}]: not a number") from None
