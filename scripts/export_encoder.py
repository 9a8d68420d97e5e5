"""Turn a torch image model into an ONNX encoder GeoCATE (and Deepness) can read.

    .venv/bin/python scripts/export_encoder.py resnet18 encoder.onnx --weights resnet18.pth \
        --bands 3 --input-size 224 --mean 0.485,0.456,0.406 --std 0.229,0.224,0.225 --pixel-scale 10000 \
        --band-order red,green,blue --resolution-m 30 --licence "BSD-3-Clause (torchvision)"

MODEL is a torchvision model name (``torchvision.models.<name>``), or
``timm:<name>`` for a timm model; its classification head is removed so the
output is the pooled embedding (N, D). ``--weights`` loads a state dict you
have (nothing is downloaded: this plugin runs where the internet may not be).
``--module path.py:function`` instead calls your own function returning a
torch.nn.Module. The metadata written (core/encoders.py) says how raw pixels
become the model's input: x / pixel_scale, then (x - mean) / std per band, and
windows are resized to input_size. Check the result with ``--check``: it runs
the file through onnxruntime and torch on random windows and prints the
largest difference.
"""

import argparse
import importlib.util
import os
import sys


def import_geocate():
    """This plugin folder as the package 'geocate', whatever the folder is called (a checkout, a profile)."""
    if "geocate" in sys.modules:
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("geocate", os.path.join(root, "__init__.py"),
                                                  submodule_search_locations=[root])
    module = importlib.util.module_from_spec(spec)
    sys.modules["geocate"] = module
    spec.loader.exec_module(module)


def numbers(text):
    return [float(v) for v in text.split(",") if v.strip()]


def build(args):
    import torch

    if args.module:
        file, function = args.module.rsplit(":", 1)
        spec = importlib.util.spec_from_file_location("user_encoder", file)
        user = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(user)
        return getattr(user, function)()
    if args.model.startswith("timm:"):
        import timm

        return timm.create_model(args.model[5:], pretrained=False, num_classes=0, in_chans=args.bands,
                                 checkpoint_path=args.weights or "")
    import torchvision

    model = getattr(torchvision.models, args.model)(weights=None)
    if args.weights:
        model.load_state_dict(torch.load(args.weights, map_location="cpu"))
    for head in ("fc", "classifier", "head", "heads"):
        if hasattr(model, head):
            setattr(model, head, torch.nn.Identity())
    if args.bands != 3:
        raise SystemExit("torchvision models take 3 bands; for other band counts use timm (in_chans) or --module.")
    return model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="torchvision model name, timm:<name>, or 'module' with --module")
    parser.add_argument("output", help="the .onnx file to write")
    parser.add_argument("--weights", help="a state dict (.pth) for the model")
    parser.add_argument("--module", help="path.py:function returning a torch.nn.Module")
    parser.add_argument("--bands", type=int, default=3)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--mean", type=numbers, required=True, help="per band, after dividing by --pixel-scale")
    parser.add_argument("--std", type=numbers, required=True)
    parser.add_argument("--pixel-scale", type=float, default=1.0, help="raw pixels are divided by this first")
    parser.add_argument("--band-order", type=lambda t: [v.strip() for v in t.split(",")])
    parser.add_argument("--resolution-m", type=float)
    parser.add_argument("--name")
    parser.add_argument("--licence")
    parser.add_argument("--check", action="store_true", help="compare onnxruntime with torch on random windows")
    args = parser.parse_args(argv)
    if len(args.mean) != args.bands or len(args.std) != args.bands:
        raise SystemExit(f"Give {args.bands} values to --mean and --std (one per band).")
    import_geocate()
    from geocate.core.encoders import OnnxEncoder, export_encoder

    module = build(args)
    export_encoder(module, args.output, args.bands, args.input_size, args.mean, args.std, args.pixel_scale,
                   args.band_order, args.resolution_m, args.name, args.licence)
    print(f"Wrote {args.output}")
    if args.check:
        import numpy as np
        import torch

        windows = np.random.default_rng(0).uniform(0, args.pixel_scale, (4, args.bands, args.input_size,
                                                                         args.input_size)).astype(np.float32)
        encoder = OnnxEncoder(args.output, device="cpu")
        mean = np.asarray(args.mean, np.float32)[None, :, None, None]
        std = np.asarray(args.std, np.float32)[None, :, None, None]
        with torch.no_grad():
            reference = module.eval()(torch.from_numpy((windows / args.pixel_scale - mean) / std))
        reference = reference.numpy()
        reference = reference.mean(axis=(2, 3)) if reference.ndim == 4 else reference
        print(f"largest |onnxruntime - torch|: {np.abs(encoder.transform(windows) - reference).max():.2e}")


if __name__ == "__main__":
    main()
