"""``quantcal data download`` and ``quantcal list``."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantcal.cli._common import EXIT_SIMPLE


@dataclass(frozen=True)
class DownloadRequest:
    name: str
    root: Path | None


@dataclass(frozen=True)
class ExportRequest:
    name: str
    out: Path
    root: Path | None
    force: bool


@dataclass(frozen=True)
class ListRequest:
    pass


def add_parsers(sub: Any) -> None:
    p = sub.add_parser(
        "data",
        help="dataset utilities",
        description="Download a dataset into the data folder (checksum-verified), or export "
        "one as an npz file in the MedMNIST layout (for `--dataset npz:FILE`).",
        epilog="examples:\n  quantcal data download cifar100 --root ~/data\n"
        "  quantcal data export cifar100 cifar100.npz   # from the verified archive\n\n"
        + EXIT_SIMPLE.replace(
            "  0    done", "  0    the file is there and its checksum matches"
        ).replace("(disk full, permission)", "(disk full, permission, no network)"),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    d = dsub.add_parser("download", help="download and verify a dataset file")
    d.add_argument("name", help="cifar100 or pathmnist")
    d.add_argument(
        "--root", default=None, help="data folder (default: $QUANTCAL_DATA or the per-user cache)"
    )
    e = dsub.add_parser(
        "export",
        help="write a downloaded dataset as one npz file (train_images, train_labels, "
        "test_images, test_labels)",
    )
    e.add_argument("name", help="cifar100")
    e.add_argument("out", help="the npz file to write, e.g. cifar100.npz")
    e.add_argument("--root", default=None, help="data folder holding the verified archive")
    e.add_argument("--force", action="store_true", help="replace an existing OUT file")
    sub.add_parser(
        "list",
        help="list models, datasets, precisions, range estimators, quantization methods, "
        "recalibrators, corruptions, unknown-input sets and built-in studies",
        description="List what can be named in a study.",
        epilog="example:\n  quantcal list\n\nexit status: 0, or 2 for a usage error",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def resolve_data(args: argparse.Namespace) -> DownloadRequest | ExportRequest:
    from quantcal.training import data

    if args.data_command == "export":
        out = Path(args.out).expanduser()
        if args.name != "cifar100":
            raise ValueError(
                f"dataset {args.name!r} cannot be exported: only cifar100 comes as an archive "
                "(pathmnist's official file already is an npz; give npz:PATH)"
            )
        if out.is_dir():
            raise ValueError(f"{out} is a folder; give the npz file's name")
        if out.exists() and not args.force:
            raise ValueError(f"{out} exists; pass --force to replace it, or choose another name")
        root = None if args.root is None else Path(args.root).expanduser()
        return ExportRequest(args.name, out, root, bool(args.force))

    if args.name not in data.SOURCES:
        raise ValueError(
            f"dataset {args.name!r} has nothing to download: downloadable datasets are "
            f"{', '.join(sorted(data.SOURCES))} ('digits' ships with scikit-learn, 'npz:PATH' is "
            "a file you have)"
        )
    root = None if args.root is None else Path(args.root).expanduser()
    if root is not None and root.exists() and not root.is_dir():
        raise ValueError(f"--root {root} is a file; give the folder datasets are kept in")
    return DownloadRequest(args.name, root)


def execute_data(req: DownloadRequest | ExportRequest) -> int:
    from quantcal.training import data

    if isinstance(req, ExportRequest):
        path = data.export_npz(req.name, req.out, root=req.root)
        print(f"written: {path} (use --dataset npz:{path})")
        return 0

    path = data.download(req.name, root=req.root)
    print(f"verified: {path}")
    return 0


def resolve_list(args: argparse.Namespace) -> ListRequest:
    return ListRequest()


def execute_list(req: ListRequest) -> int:
    from quantcal import models, quant
    from quantcal.calibration import recal
    from quantcal.study.config import REUSE_FP32_TEMPERATURE, builtin_studies
    from quantcal.training import data, objectives

    print("models:          " + ", ".join(models.list_models()))
    print("datasets:        " + ", ".join(data.list_datasets()) + ", npz:PATH")
    print("precisions:      " + ", ".join(quant.PRECISIONS) + " (any wXaY with 2 <= X, Y <= 16)")
    print("range estimators:" + " " + ", ".join(quant.available_observers()))
    print("quant methods:   " + ", ".join(quant.available_methods()) + " ([quant] methods)")
    print("recalibrators:   " + ", ".join([*recal.available(), REUSE_FP32_TEMPERATURE]))
    print("objectives:      " + ", ".join(objectives.available()) + " ([train] objectives)")
    from quantcal.training.corruptions import CORRUPTIONS
    from quantcal.training.ood_sets import SYNTHETIC_OOD

    print("corruptions:     " + ", ".join(CORRUPTIONS) + " ([data] shifts, NAME:1..5)")
    print("unknown inputs:  " + ", ".join(SYNTHETIC_OOD) + ", npz:PATH ([data] ood)")
    print("studies:         " + ", ".join(builtin_studies()))
    return 0
