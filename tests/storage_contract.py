"""The storage contract as a reusable test mixin (fsspec's style): subclass it with a
``storage`` fixture and every primitive's behaviour is pinned for that backend."""

from __future__ import annotations

import threading

import pytest

from distrib.checkpoint.storage import Storage, StorageError, UnsafePath


class StorageContract:
    """Subclasses provide a ``storage`` fixture returning an empty :class:`Storage`."""

    def test_absent_paths(self, storage: Storage) -> None:
        assert storage.list("") == [] and storage.list("nope") == []
        assert storage.exists("nope") is False and storage.size("nope") is None
        assert storage.sizes("nope") == {}
        with pytest.raises(FileNotFoundError):
            storage.read("nope")
        storage.delete("nope")  # missing is fine
        storage.delete_tree("nope")

    def test_write_read_replace_and_list(self, storage: Storage) -> None:
        storage.write("d/a.bin", [b"abc", memoryview(b"def")])
        assert storage.read("d/a.bin") == b"abcdef" and storage.size("d/a.bin") == 6
        storage.write("d/a.bin", [b"x"])
        assert storage.read("d/a.bin") == b"x"
        storage.write("d/b.bin", [b"12345"])
        assert storage.list("") == ["d"] and storage.list("d") == ["a.bin", "b.bin"]
        assert storage.sizes("d") == {"a.bin": 1, "b.bin": 5}
        assert storage.exists("d") and storage.exists("d/b.bin")

    def test_read_limit(self, storage: Storage) -> None:
        storage.write("f", [b"0123456789"])
        assert storage.read("f", limit=10) == b"0123456789"
        with pytest.raises(StorageError):
            storage.read("f", limit=9)

    def test_read_segments_checks_the_size(self, storage: Storage) -> None:
        storage.write("f", [b"0123456789"])
        outs = [memoryview(bytearray(4)), memoryview(bytearray(6))]
        seen: list[bytes] = []
        storage.read_segments("f", outs, lambda mv: seen.append(bytes(mv)))
        assert seen == [b"0123", b"456789"]
        with pytest.raises(StorageError):
            storage.read_segments("f", [memoryview(bytearray(11))])

    def test_write_new_is_create_only(self, storage: Storage) -> None:
        storage.write_new("m.json", b"first")
        with pytest.raises(FileExistsError):
            storage.write_new("m.json", b"second")
        assert storage.read("m.json") == b"first"

    def test_racing_creators_exactly_one_wins(self, storage: Storage) -> None:
        barrier, wins = threading.Barrier(4), []

        def create(i: int) -> None:
            barrier.wait()
            try:
                storage.write_new("race.json", str(i).encode())
                wins.append(i)
            except FileExistsError:
                pass

        threads = [threading.Thread(target=create, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1 and storage.read("race.json") == str(wins[0]).encode()

    def test_delete_and_delete_tree(self, storage: Storage) -> None:
        storage.write("t/a", [b"1"])
        storage.write("t/sub/b", [b"2"])
        storage.delete("t/a")
        assert storage.size("t/a") is None and storage.size("t/sub/b") == 1
        storage.delete_tree("t")
        assert storage.list("t") == [] and not storage.exists("t/sub/b")

    def test_rename_dir_onto_an_existing_directory_is_refused(self, storage: Storage) -> None:
        if not storage.supports_rename:
            with pytest.raises(NotImplementedError):
                storage.rename_dir("a", "b")
            return
        storage.write("src/f", [b"1"])
        storage.write("dst/g", [b"2"])
        with pytest.raises(FileExistsError):
            storage.rename_dir("src", "dst")
        storage.rename_dir("src", "moved")
        assert storage.read("moved/f") == b"1" and storage.list("src") == []

    @pytest.mark.parametrize("rel", ["../x", "a/../../x", "/etc/passwd", "a//b", "a/./b",
                                     "a\x00b", "a\nb", "a\\b"])
    def test_paths_that_leave_the_root_are_refused(self, storage: Storage, rel: str) -> None:
        for op in (lambda: storage.read(rel), lambda: storage.size(rel),
                   lambda: storage.list(rel), lambda: storage.delete(rel),
                   lambda: storage.write(rel, [b"x"]), lambda: storage.exists(rel)):
            with pytest.raises(UnsafePath):
                op()
