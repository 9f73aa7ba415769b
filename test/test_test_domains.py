"""IRE_VLA_TEST_DOMAINS is checked before any test: Fast DDS ends the whole process (exit 1, its
reason only on captured stderr) for domain ids over 232, so a bad range must fail with its reason."""
import pytest

from conftest import MAX_DOMAIN_ID, _domain_range


def test_a_valid_range_is_taken():
    assert _domain_range("120-140") == (120, 140)
    assert _domain_range(f"0-{MAX_DOMAIN_ID}") == (0, MAX_DOMAIN_ID)


@pytest.mark.parametrize("text, reason", [("220-250", "HI <= 232"), ("140-120", "LO <= HI"),
                                          ("120", "expected LO-HI"), ("a-b", "expected LO-HI")])
def test_a_bad_range_is_refused_with_its_reason(text, reason):
    with pytest.raises(pytest.UsageError, match=reason):
        _domain_range(text)
