"""The one exponential backoff (`sdapi.infra.backoff`) and those who use it."""

from __future__ import annotations

from sdapi.infra.backoff import backoff_s
from sdapi.infra.queue import retry_after


def test_backoff_doubles_from_base_up_to_the_cap() -> None:
    delays = [backoff_s(attempts, base=1.0, cap=30) for attempts in range(1, 8)]
    assert delays == [1, 2, 4, 8, 16, 30, 30]
    assert backoff_s(0, base=2.0, cap=60) == 2.0
    # A huge count stays finite: the exponent stops growing long before.
    assert backoff_s(10**9, base=2.0, cap=600.0) == 600.0


def test_backoff_jitter_only_shortens_by_up_to_its_fraction() -> None:
    for _ in range(50):
        assert 7.2 <= backoff_s(3, base=2.0, cap=600.0, jitter=0.1) <= 8.0


def test_backoff_is_the_retry_after_of_a_queue_job() -> None:
    # arq counts tries from 1; retry_after waits 2 s, then doubles up to 60 s.
    for job_try in range(1, 12):
        expected = backoff_s(job_try, base=2.0, cap=60)
        assert retry_after({"job_try": job_try}).defer_score == expected * 1000
    assert retry_after({"job_try": 3}, cap_s=5).defer_score == 5000
