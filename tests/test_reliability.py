"""Bad data never stops a run and is never lost silently; untrusted files cannot escape or explode."""

from __future__ import annotations

import io
import os
import struct
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_pipeline, trained_pipeline
from PIL import Image
from safetensors.torch import load_file

from sdxl_lib.config import BucketParams, TrainParams
from sdxl_lib.data.files import copy_dataset
from sdxl_lib.data.images import open_rgb
from sdxl_lib.data.plan import build_plan
from sdxl_lib.errors import UserError
from sdxl_lib.export import LORA_WEIGHTS, save_lora
from sdxl_lib.models.loading import load_unet
from sdxl_lib.sources import pin_model
from sdxl_lib.train.lora import load_init_lora


def png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares `width` x `height` pixels and holds almost none: a decompression bomb's
    header, without the memory a real one would take to make."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def encoded(image: Image.Image, fmt: str, **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return buffer.getvalue()


def noise(size: tuple[int, int], seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def fault_corpus(folder: Path, outside: Path) -> None:
    """One file per fault the bucket stage must survive, plus images it must convert correctly."""
    folder.mkdir(parents=True)
    good_jpeg = encoded(noise((256, 256), 1), "JPEG")
    good_png = encoded(noise((256, 256), 2), "PNG")
    (folder / "zero_bytes.jpg").write_bytes(b"")
    (folder / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (folder / "truncated.png").write_bytes(good_png[: len(good_png) // 2])
    good_webp = encoded(noise((256, 256), 3), "WEBP")
    (folder / "truncated.webp").write_bytes(good_webp[: len(good_webp) - 100])
    (folder / "text_file.jpg").write_text("this is not an image\n")
    (folder / "bomb.png").write_bytes(png_header_only(20000, 10000))  # 200 MP
    Image.new("RGB", (1, 1), "red").save(folder / "one_pixel.png")
    Image.new("RGB", (20000, 200), "red").save(folder / "extreme_20000x200.png")
    Image.new("CMYK", (200, 200), (0, 0, 0, 0)).save(folder / "cmyk.jpg")
    Image.fromarray(np.full((200, 200), 40000, np.uint16)).save(folder / "gray16.png")
    Image.new("L", (200, 200), 100).save(folder / "gray.png")
    rgba = Image.new("RGBA", (200, 200), (255, 0, 0, 0))
    rgba.paste((0, 0, 255, 128), (0, 0, 100, 200))
    rgba.save(folder / "rgba.png")
    palette = Image.new("P", (200, 200), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.paste(1, (0, 0, 100, 200))
    palette.save(folder / "palette_transparent.png", transparency=0)
    frames = [Image.new("RGB", (200, 200), color) for color in ("red", "blue")]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:], duration=100)
    frames[0].save(folder / "animated.webp", save_all=True, append_images=frames[1:], lossless=True)
    noise((200, 200), 3).save(folder / "original.png")
    (folder / "same_bytes.png").write_bytes((folder / "original.png").read_bytes())
    (folder / "broken_link.png").symlink_to(folder / "does_not_exist.png")
    noise((200, 200), 4).save(outside / "secret.png")
    (folder / "escaping_link.png").symlink_to(outside / "secret.png")
    noise((200, 200), 5).save(folder / "inside_target.png")
    (folder / "inside_link.png").symlink_to("inside_target.png")
    os.mkfifo(folder / "fifo.jpg")
    noise((200, 200), 6).save(Path(os.fsdecode(bytes(folder) + b"/caf\xe9.png")))
    # captions: one rule each
    for name in ("no_sidecar", "empty_sidecar", "binary_sidecar", "latin1_sidecar", "bom_sidecar"):
        noise((200, 200), sum(name.encode())).save(folder / f"{name}.png")
    (folder / "empty_sidecar.txt").write_text("\n  \n")
    (folder / "binary_sidecar.txt").write_bytes(b"\x00\x01\x02PNG")
    (folder / "latin1_sidecar.txt").write_bytes("café au lait".encode("latin-1"))
    (folder / "bom_sidecar.txt").write_bytes("\ufeffcafé au lait\n".encode())


def test_every_bad_file_is_used_or_skipped_with_its_reason(tmp_path: Path) -> None:
    source, outside, raw = tmp_path / "source", tmp_path / "outside", tmp_path / "raw"
    outside.mkdir()
    fault_corpus(source, outside)
    not_copied = copy_dataset(source, raw / "d", allowed=source, max_extracted_gb=1)
    params = BucketParams(resolution=128, eval_fraction=0, bucket_pruning="oversubscribe")
    plan, skipped, summary = build_plan(
        [("d", raw / "d")],
        params,
        raw,
        1,
        skipped_earlier=[{**s, "path": f"d/{s['path']}"} for s in not_copied],
    )
    reasons = {
        path.removeprefix("d/"): reason for path, reason in zip(*skipped.to_pydict().values(), strict=True)
    }
    for name in ("zero_bytes.jpg", "truncated.jpg", "truncated.png", "truncated.webp", "text_file.jpg"):
        assert reasons.pop(name).startswith("unreadable: "), name
    assert reasons == {
        "bomb.png": "decompression_bomb: over 178956970 pixels",
        "one_pixel.png": "degenerate_size 1x1",
        "same_bytes.png": "duplicate of d/original.png",
        "inside_target.png": "duplicate of d/inside_link.png",  # a link inside is followed: same bytes
        "broken_link.png": "broken_symlink",
        "escaping_link.png": "symlink_outside_dataset (download.allow_symlinks)",
        "fifo.jpg": "not_a_regular_file",
        "caf\\xe9.png": "name_not_utf8 (rename the file)",
    }
    rows = {row["path"].removeprefix("d/"): row for row in plan.to_pylist()}
    kept = {
        "extreme_20000x200.png", "cmyk.jpg", "gray16.png", "gray.png", "rgba.png", "palette_transparent.png",
        "animated.gif", "animated.webp", "original.png", "inside_link.png",
        "no_sidecar.png", "empty_sidecar.png", "binary_sidecar.png", "latin1_sidecar.png", "bom_sidecar.png",
    }  # fmt: skip
    assert set(rows) == kept
    assert summary["kept"] == len(kept) and sum(summary["skipped"].values()) == 13
    assert (rows["extreme_20000x200.png"]["original_width"], rows["extreme_20000x200.png"]["aspect"]) == (
        20000,
        100,
    )

    # conversions to RGB, known answers (alpha composited on white)
    def pixel(name: str, xy: tuple[int, int] = (150, 100)) -> tuple[int, ...]:
        return open_rgb(raw / "d" / name).getpixel(xy)

    assert pixel("cmyk.jpg") == (255, 255, 255)
    assert pixel("gray16.png") == (156, 156, 156)  # 40000 >> 8, not clipped to white
    assert pixel("gray.png") == (100, 100, 100)
    assert pixel("rgba.png") == (255, 255, 255)  # fully transparent red is the background
    assert pixel("rgba.png", (50, 100)) == (127, 127, 255)  # half-transparent blue over white
    assert pixel("palette_transparent.png") == (255, 255, 255)
    assert pixel("palette_transparent.png", (50, 100)) == (0, 255, 0)
    assert pixel("animated.gif") == pixel("animated.webp") == (255, 0, 0)  # the first frame

    captions = {name: (row["caption"], row["caption_source"]) for name, row in rows.items()}
    assert captions["no_sidecar.png"] == ("no sidecar", "filename_no_sidecar")
    assert captions["empty_sidecar.png"] == ("empty sidecar", "filename_sidecar_empty")
    assert captions["binary_sidecar.png"] == ("binary sidecar", "filename_sidecar_not_utf8")
    assert captions["latin1_sidecar.png"] == ("latin1 sidecar", "filename_sidecar_not_utf8")
    assert captions["bom_sidecar.png"] == ("café au lait", "textfile")
    assert summary["caption_sources"]["filename_sidecar_not_utf8"] == 2


def test_allow_symlinks_follows_links_out_of_the_dataset(tmp_path: Path) -> None:
    source, outside = tmp_path / "source", tmp_path / "outside"
    source.mkdir()
    outside.mkdir()
    noise((64, 64), 1).save(outside / "secret.png")
    (source / "link.png").symlink_to(outside / "secret.png")
    # a file that opens but cannot be read (EIO), which even root meets: a process's memory at offset 0
    (source / "unreadable.png").symlink_to("/proc/self/mem")
    assert len(copy_dataset(source, tmp_path / "strict", allowed=source, max_extracted_gb=1)) == 2
    skipped = copy_dataset(source, tmp_path / "allowed", allowed=None, max_extracted_gb=1)
    assert skipped == [{"path": "unreadable.png", "reason": "unreadable: Input/output error"}]
    assert (tmp_path / "allowed/link.png").read_bytes() == (outside / "secret.png").read_bytes()
    assert not (tmp_path / "allowed/unreadable.png").exists()


def tar_with(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)


def test_archives_are_unpacked_safely(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    image = encoded(noise((64, 64), 7), "PNG")
    with zipfile.ZipFile(source / "photos.zip", "w") as zf:
        zf.writestr("set/a.png", image)
        zf.writestr("set/a.txt", "a caption")
    tar_with(
        source / "more.tar.gz", {"b.png": encoded(noise((64, 64), 8), "PNG")}, {"link.png": "/etc/passwd"}
    )
    with zipfile.ZipFile(source / "escape.zip", "w") as zf:
        zf.writestr("../../escaped.png", image)
    tar_with(source / "absolute.tar.gz", {"/tmp/absolute.png": image})
    with zipfile.ZipFile(source / "bomb.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.png", bytes(64 << 20))  # 64 MiB of zeros in ~64 KiB: 1000x
    (source / "corrupt.zip").write_bytes(b"PK\x03\x04 not really")

    target = tmp_path / "raw"
    skipped = {s["path"]: s["reason"] for s in copy_dataset(source, target, source, max_extracted_gb=1)}
    assert (
        skipped.pop("escape.zip")
        == "archive_path_traversal: member '../../escaped.png' leaves the archive's folder"
    )
    assert (
        skipped.pop("absolute.tar.gz")
        == "archive_path_traversal: member '/tmp/absolute.png' is an absolute path"
    )
    assert skipped.pop("bomb.zip").startswith("archive_too_large: 64 MiB unpacked exceeds")
    assert skipped.pop("corrupt.zip").startswith("unreadable_archive: ")
    assert skipped == {"more.tar.gz/link.png": "archive_member_not_a_file"}
    files = sorted(
        p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file() or p.is_symlink()
    )
    assert files == ["more/b.png", "photos/set/a.png", "photos/set/a.txt"]
    assert (target / "photos/set/a.png").read_bytes() == image
    assert not list(tmp_path.rglob("escaped.png")) and not Path("/tmp/absolute.png").exists()


def test_an_archive_over_the_size_limit_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    tar_with(source / "big.tar.gz", {"noise.bin": np.random.default_rng(0).bytes(3 << 20)})
    skipped = copy_dataset(source, tmp_path / "raw", source, max_extracted_gb=2 / 1024)
    assert skipped == [
        {
            "path": "big.tar.gz",
            "reason": "archive_too_large: 3 MiB unpacked exceeds 2 MiB "
            "(download.max_extracted_gb, or 200x the archive)",
        }
    ]
    assert not (tmp_path / "raw/big").exists()


@pytest.mark.parametrize("suffix", [".pt", ".bin"])
def test_pickle_lora_needs_the_opt_in_and_then_loads_tensors_only(tmp_path: Path, suffix: str) -> None:
    trained, models = trained_pipeline(TrainParams(), text_encoders=False)
    save_lora(models, tmp_path, lora_format="diffusers")
    pickled = tmp_path / f"lora{suffix}"
    torch.save(load_file(tmp_path / LORA_WEIGHTS), pickled)
    unet = tiny_pipeline().unet
    with pytest.raises(UserError, match="is a pickle file, which can run code"):
        load_init_lora({"unet": unet}, str(pickled))

    class RunsCode:
        def __reduce__(self) -> tuple:
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    evil = tmp_path / f"evil{suffix}"
    torch.save({"unet.x.lora_A.weight": torch.zeros(1), "payload": RunsCode()}, evil)
    with pytest.raises(UserError, match="holds more than tensors, refused"):
        load_init_lora({"unet": unet}, str(evil), allow_pickle=True)
    assert not (tmp_path / "pwned").exists()

    assert load_init_lora({"unet": unet}, str(pickled), allow_pickle=True) == {"unet"}
    loaded = {k: v for k, v in unet.state_dict().items() if "lora_" in k}
    expected = {k: v for k, v in trained.unet.state_dict().items() if "lora_" in k}
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_pickle_base_model_needs_the_opt_in(tmp_path: Path) -> None:
    pipeline = tiny_pipeline()
    pipeline.save_pretrained(tmp_path / "model", safe_serialization=False)
    assert not list((tmp_path / "model/unet").glob("*.safetensors"))
    with pytest.raises(UserError, match=r"diffusion_pytorch_model.bin\), which can run code"):
        pin_model(str(tmp_path / "model"))
    entry = pin_model(str(tmp_path / "model"), allow_pickle=True)
    assert entry["weights"] == "pickle"
    unet = load_unet({"model": entry})
    assert all(torch.equal(v, pipeline.unet.state_dict()[k]) for k, v in unet.state_dict().items())


def test_no_remote_code_is_ever_trusted() -> None:
    """Model repos can ship Python that `trust_remote_code=True` would run: the project never asks."""
    root = Path(__file__).resolve().parents[1]
    sources = [p for folder in ("sdxl_lib", "stages", "bench") for p in (root / folder).rglob("*.py")]
    assert sources and not [p for p in sources if "trust_remote_code" in p.read_text()]
