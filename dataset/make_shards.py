"""Convert the official pretraining JSON lists into WebDataset tar shards (see dataset/shards.py for the layout).

    python -m dataset.make_shards --ann data/coco.json data/vg.json data/cc3m.json data/sbu.json \
        --image_root / --out data/shards_4m --shard_size 1000 --max_size 384 --workers 16

Then train with `--opt train_shards=data/shards_4m`. Each shard is written under a temporary name and renamed when
complete, and index.json (shard names, sample counts) is written last: a folder without index.json is an unfinished
conversion. `--max_size N` re-encodes images whose shorter side exceeds N pixels as JPEG with that shorter side
(smaller shards, faster decoding; the pretraining crop is 256 pixels); smaller images keep their original bytes.
"""
import argparse
import io
import json
import os
import random
import sys
from multiprocessing import get_context

from PIL import Image

from dataset.image_io import ImageLoadError, join_root, load_image, read_annotations
from dataset.shards import INDEX_FORMAT, INDEX_NAME

_EXT_ALIASES = {"jpeg": "jpg"}


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments of the converter."""
    p = argparse.ArgumentParser(description="Write pretraining JSON lists as WebDataset tar shards.")
    p.add_argument("--ann", nargs="+", required=True, help="pretraining JSON list(s): [{image, caption}, ...]")
    p.add_argument("--image_root", default="", help="folder the annotations' image paths are relative to")
    p.add_argument("--out", required=True, help="output folder for shard-XXXXXX.tar and index.json")
    p.add_argument("--shard_size", type=int, default=1000, help="samples per shard")
    p.add_argument("--max_size", type=int, default=None,
                   help="re-encode images whose shorter side exceeds this many pixels (JPEG); default: copy bytes")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality when re-encoding")
    p.add_argument("--seed", type=int, default=0, help="seed of the shuffle that mixes the sources across shards")
    p.add_argument("--keep_order", action="store_true", help="keep the annotation order instead of shuffling")
    p.add_argument("--skip_bad_images", action="store_true",
                   help="leave out (and list in index.json) images that are missing or unreadable instead of failing")
    p.add_argument("--workers", type=int, default=1, help="processes writing shards in parallel")
    return p


def _image_bytes(path: str, index: int, max_size, quality: int = 90):
    """(bytes, extension) of one image: the original file, or a smaller JPEG re-encoding when it is too large."""
    if max_size:
        image = load_image(path, index)
        if min(image.size) > max_size:
            scale = max_size / min(image.size)
            size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
            buffer = io.BytesIO()
            image.resize(size, Image.BICUBIC).save(buffer, format="JPEG", quality=quality)
            return buffer.getvalue(), "jpg"
    try:
        with open(path, "rb") as handle:
            data = handle.read()
        with Image.open(io.BytesIO(data)) as img:
            img.verify()  # cheap structural check; a full decode happens at training time
    except Exception as err:
        raise ImageLoadError(f"cannot read image '{path}' (annotation index {index}): {type(err).__name__}: {err}. "
                             f"Fix: correct --image_root / the annotation, or pass --skip_bad_images",
                             path=path, index=index) from err
    ext = os.path.splitext(path)[1].lower().lstrip(".") or "jpg"
    return data, _EXT_ALIASES.get(ext, ext)



def write_shard(job: dict) -> dict:
    """Write one shard (temporary name, then rename); returns its index entry and the images it left out."""
    from webdataset import TarWriter

    name = f"shard-{job['shard']:06d}.tar"
    final = os.path.join(job["out"], name)
    tmp = os.path.join(job["out"], f".{name}.tmp")
    skipped, written = [], 0
    try:
        with open(tmp, "wb") as handle:
            writer = TarWriter(handle, mtime=0.0)  # fixed mtime: the same input gives byte-identical shards
            for index, image, caption in job["items"]:
                try:
                    data, ext = _image_bytes(image, index, job["max_size"], job["quality"])
                except ImageLoadError as err:
                    if not job["skip_bad_images"]:
                        raise
                    skipped.append({"image": image, "index": index, "error": str(err)})
                    continue
                meta = {"caption": caption, "image": image, "index": index}
                writer.write({"__key__": f"{index:09d}", ext: data, "json": json.dumps(meta).encode("utf-8")})
                written += 1
            writer.close()
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return {"name": name, "samples": written, "skipped": skipped}


def plan_shards(items: list, shard_size: int, seed: int, keep_order: bool) -> list:
    """Split (index, image path, caption) items into shards, shuffled across sources unless keep_order."""
    if shard_size < 1:
        raise ValueError(f"--shard_size must be at least 1, got {shard_size}")
    order = list(items)
    if not keep_order:
        random.Random(seed).shuffle(order)
    return [order[i:i + shard_size] for i in range(0, len(order), shard_size)]


def _write_index(path: str, index: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(index, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def main(argv=None) -> dict:
    """Convert, print a summary and return the index written to <out>/index.json."""
    args = build_parser().parse_args(argv)
    annotations = read_annotations(args.ann, required_keys=("image", "caption"))
    items = [(i, join_root(args.image_root, a["image"]), a["caption"]) for i, a in enumerate(annotations)]
    os.makedirs(args.out, exist_ok=True)
    index_path = os.path.join(args.out, INDEX_NAME)
    if os.path.exists(index_path):
        os.remove(index_path)  # the folder is being rewritten: it is not a finished conversion until the end
    jobs = [{"shard": n, "out": args.out, "items": chunk, "max_size": args.max_size, "quality": args.quality,
             "skip_bad_images": args.skip_bad_images}
            for n, chunk in enumerate(plan_shards(items, args.shard_size, args.seed, args.keep_order))]
    if args.workers > 1:
        with get_context("spawn").Pool(args.workers) as pool:
            results = list(pool.imap(write_shard, jobs))
    else:
        results = [write_shard(job) for job in jobs]
    skipped = [s for r in results for s in r.pop("skipped")]
    index = {"format": INDEX_FORMAT, "shards": results, "total": sum(r["samples"] for r in results),
             "sources": [os.path.abspath(a) for a in args.ann], "image_root": args.image_root,
             "max_size": args.max_size, "skipped": skipped}
    _write_index(index_path, index)
    print(f"wrote {index['total']} samples in {len(results)} shards to {args.out}"
          + (f"; left out {len(skipped)} unreadable images (listed in {index_path})" if skipped else ""))
    return index


if __name__ == "__main__":
    main(sys.argv[1:])
