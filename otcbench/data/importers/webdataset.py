"""webdataset tar shards: ``shards/{00000..00009}.tar``, a directory of ``.tar`` files, or one tar.

Each sample is the group of members sharing a key (the path up to the first dot of the file name):
``000123.jpg`` + ``000123.txt`` (+ ``000123.cls`` for a class index, + ``000123.json``, whose
``caption`` is used when there is no text member). Shards are streamed in order, one pass to count the
samples and one to import them; images come out of the tar as bytes.
"""

from __future__ import annotations

import json
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from pydantic import Field

from otcbench.data.importers.base import IMPORTERS, ImageRef, Importer, PairImportOptions, Record, Scan, clean_caption
from otcbench.errors import UserError

_BRACE = re.compile(r"\{([^{}]*)\}")
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp")


class WdsOptions(PairImportOptions):
    caption_ext: str = Field("txt", description="extension of the caption member (json: its 'caption' field)")


def expand_braces(pattern: str) -> list[str]:
    """``a/{000..002}.tar`` → a/000.tar, a/001.tar, a/002.tar; ``{x,y}`` lists too; zero padding kept."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        if int(hi) < int(lo):
            raise UserError(f"shard pattern {pattern!r}: range {{{body}}} runs backwards")
        width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    out = []
    for item in items:
        out.extend(expand_braces(pattern[: m.start()] + item + pattern[m.end():]))
    return out


def split_key(name: str) -> tuple[str, str]:
    """webdataset's convention: ``dir/abc.seg.png`` → key ``dir/abc``, extension ``seg.png``."""
    p = PurePosixPath(name)
    base, _, ext = p.name.partition(".")
    return str(p.with_name(base)), ext.lower()


@IMPORTERS.register("webdataset")
class WebdatasetImporter(Importer):
    """webdataset tar shards ({00000..00009}.tar pattern or a directory): image + .txt caption per key."""

    Options = WdsOptions
    layout = "tar shards: 'dir/{00000..00009}.tar', a directory of .tar files or one .tar; KEY.jpg + KEY.txt"

    def shards(self) -> list[Path]:
        src = self.src
        if "{" in src:
            paths = [Path(p) for p in expand_braces(src)]
            missing = [p for p in paths if not p.is_file()]
            if missing:
                raise UserError(f"{len(missing)} of {len(paths)} shards of {src} do not exist (first: {missing[0]})")
            return paths
        p = self.src_path()
        if p.is_dir():
            paths = sorted(q for q in p.iterdir() if q.name.endswith((".tar", ".tar.gz", ".tgz")))
            if not paths:
                raise UserError(f"directory {p} holds no .tar shards")
            return paths
        return [p]

    def scan(self) -> Scan:
        opts: WdsOptions = self.options  # type: ignore[assignment]
        shards = self.shards()
        total = 0
        for shard in shards:  # headers only: counts the samples for progress and the early threshold check
            keys = {split_key(n)[0] for n in self._names(shard)}
            total += len(keys)
        if total == 0:
            raise UserError(f"the shards of {self.src} hold no samples")
        cap_ext = opts.caption_ext.lower().lstrip(".")

        def records() -> Iterator[Record]:
            for i, shard in enumerate(shards):
                for key, members in self._samples(shard):
                    where = f"{shard.name}:{key}"
                    img_ext = next((e for e in IMAGE_EXTS if e in members), None)
                    caption = None
                    if cap_ext in members:
                        caption = self._text(members[cap_ext], cap_ext)
                    elif "json" in members:
                        caption = self._text(members["json"], "json")
                    if img_ext is None:
                        self.skips.add("missing_image", f"{where}: no image member ({', '.join(members)})")
                        continue
                    caption = clean_caption(caption)
                    if not caption:
                        self.skips.add("missing_caption", f"{where}: no .{cap_ext} caption")
                        continue
                    label = -1
                    if "cls" in members:
                        try:
                            label = int(members["cls"].decode().strip())
                        except (UnicodeDecodeError, ValueError):
                            self.skips.add("bad_label", f"{where}: .cls is not an integer")
                            continue
                    ref = ImageRef(key=where, name=f"{i:05d}-{_stem(shard)}/{key}.{img_ext}", data=members[img_ext])
                    yield Record(ref, caption, label)

        return Scan(records(), total, info={"shards": len(shards)})

    @staticmethod
    def _text(blob: bytes, ext: str) -> str | None:
        try:
            text = blob.decode("utf-8")
        except UnicodeDecodeError:
            return None
        if ext == "json":
            try:
                doc = json.loads(text)
            except json.JSONDecodeError:
                return None
            return doc.get("caption") if isinstance(doc, dict) and isinstance(doc.get("caption"), str) else None
        return text

    @staticmethod
    def _names(shard: Path) -> list[str]:
        try:
            with tarfile.open(shard) as tf:
                return [m.name for m in tf.getmembers() if m.isfile()]
        except (tarfile.TarError, OSError) as err:
            raise UserError(f"shard {shard} is not a readable tar file ({type(err).__name__})") from None

    @staticmethod
    def _samples(shard: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
        """Stream a shard: (key, {extension: bytes}) for each run of members sharing a key."""
        key, members = None, {}
        try:
            with tarfile.open(shard, mode="r|*") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    k, ext = split_key(m.name)
                    if k != key:
                        if key is not None:
                            yield key, members
                        key, members = k, {}
                    f = tf.extractfile(m)
                    members[ext] = f.read() if f is not None else b""
        except (tarfile.TarError, OSError) as err:
            raise UserError(f"shard {shard} could not be read to the end ({type(err).__name__}); "
                            "the file is truncated or corrupt") from None
        if key is not None:
            yield key, members


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".tar.gz", ".tgz", ".tar"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name
