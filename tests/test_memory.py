"""One malloc arena for predict's threads (issue 31)."""

import platform

import pytest

from anomalyncd.memory import share_one_arena


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt's arena limit is glibc's")
def test_threads_share_one_arena_on_glibc(monkeypatch):
    monkeypatch.delenv("MALLOC_ARENA_MAX", raising=False)
    assert share_one_arena()


def test_an_arena_limit_the_user_set_is_left_alone(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert not share_one_arena()
