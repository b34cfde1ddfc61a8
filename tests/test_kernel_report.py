"""The per-vCPU report file: written atomically, by more than one thread."""

from __future__ import annotations

from pathlib import Path

from services.frontend.kernel import report


def test_two_writers_of_one_report_do_not_trip_over_each_other(tmp_path: Path) -> None:
    """The reporter thread and the vCPU's own thread may write at once; each
    write has its own temporary file, so every rename finds its file."""
    import threading

    path = tmp_path / "guests" / "dom1" / "vcpu0.json"
    errors: list[BaseException] = []

    def writer(tag: bytes) -> None:
        try:
            for _ in range(300):
                report.write_bytes_atomic(path, tag * 100)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in (b"a", b"b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    assert path.read_bytes() in (b"a" * 100, b"b" * 100)
    assert [p.name for p in path.parent.iterdir()] == ["vcpu0.json"]  # no temporary left
