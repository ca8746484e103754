"""Caller numbers from prefix templates give exactly phonenumbers' answers."""

from __future__ import annotations

import random

import phonenumbers

from gateway.channels.voice.intake import _caller_address, caller_address
from gateway.channels.voice.numbers import PrefixTemplates, region_rule

TYPES = (
    phonenumbers.PhoneNumberType.FIXED_LINE, phonenumbers.PhoneNumberType.MOBILE,
    phonenumbers.PhoneNumberType.TOLL_FREE, phonenumbers.PhoneNumberType.PREMIUM_RATE,
    phonenumbers.PhoneNumberType.SHARED_COST, phonenumbers.PhoneNumberType.VOIP,
    phonenumbers.PhoneNumberType.UAN,
)


def numbers_of(region: str, rng: random.Random) -> list[str]:
    """Numbers as a PBX may show them: the region's example numbers (with and without the
    national prefix and the country code) and, for each, siblings that keep a leading part and
    draw the rest, so that many share their leading digits (templates are made and used)."""
    metadata = phonenumbers.PhoneMetadata.metadata_for_region(region)
    seeds: list[str] = []
    for kind in TYPES:
        example = phonenumbers.example_number_for_type(region, kind)
        if example is None:
            continue
        national = phonenumbers.national_significant_number(example)
        seeds.append(national)
        if metadata is not None and metadata.national_prefix:
            seeds.append(metadata.national_prefix + national)
        seeds.append(f"{example.country_code}{national}")
    found: list[str] = []
    for seed in seeds:
        for _ in range(8):
            keep = rng.randrange(len(seed) + 1)
            length = max(1, len(seed) + rng.choice((0, 0, 0, -1, 1)))
            rest = "".join(rng.choice("0123456789") for _ in range(max(0, length - keep)))
            found.append((seed[:keep] + rest)[:length])
    found += ["".join(rng.choice("0123456789") for _ in range(rng.randrange(2, 16)))
              for _ in range(40)]
    return found


def test_templates_give_phonenumbers_answers_in_every_region() -> None:
    rng = random.Random(16)
    checked = templated = 0
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        templates = PrefixTemplates(_caller_address)
        for number in numbers_of(region, rng):
            expected = _caller_address(number, region)
            heads = len(templates._heads)
            assert templates(number, region) == expected, (region, number)
            templated += len(templates._heads) == heads and region_rule(region) is not None
            checked += 1
    assert checked > 20_000
    assert templated > checked // 4  # most answers came from a template


def test_chinese_mobiles_and_landlines() -> None:
    rng = random.Random(12345)
    templates = PrefixTemplates(_caller_address)
    for prefix in ("138", "159", "186", "170", "199", "010", "021", "0755", "400", "95",
                   "1795", "11", "12", "86", "0086", "00", "17951"):
        for _ in range(200):
            length = rng.choice((len(prefix) + 1, 7, 8, 10, 11, 12, 13))
            number = (prefix + "".join(rng.choice("0123456789") for _ in range(13)))[:length]
            assert templates(number, "CN") == _caller_address(number, "CN"), number
    assert region_rule("CN") is not None
    assert caller_address("13800138000", "CN") == "+8613800138000"
    assert caller_address("13800138001", "CN") == "+8613800138001"
    assert caller_address("01012345678", "CN") == "+861012345678"


def test_regions_without_a_rule_go_to_phonenumbers() -> None:
    assert region_rule("US") is None  # +1 is shared by the NANPA regions
    templates = PrefixTemplates(_caller_address)
    assert templates("2015550123", "US") == _caller_address("2015550123", "US")
    assert not templates._heads


def test_a_python_without_cpythons_regex_parser_still_converts_every_number() -> None:
    """The rules read CPython's private ``re._parser``: on a Python without it (or where it
    moved) the module still imports, and every number goes to phonenumbers."""
    import subprocess
    import sys

    script = (
        "import re, sys\n"  # as if re had no such modules (re itself keeps working)
        "del re._parser, re._constants\n"
        "sys.modules['re._parser'] = sys.modules['re._constants'] = None\n"
        "from gateway.channels.voice.numbers import PrefixTemplates, region_rule\n"
        "import phonenumbers\n"
        "assert region_rule('CN') is None\n"
        "def convert(raw, region):\n"
        "    n = phonenumbers.parse(raw, region)\n"
        "    return phonenumbers.format_number(n, phonenumbers.PhoneNumberFormat.E164)\n"
        "t = PrefixTemplates(convert)\n"
        "print(t('13800138000', 'CN'), t('01088886666', 'CN'))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["+8613800138000", "+861088886666"]
