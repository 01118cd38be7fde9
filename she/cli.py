"""The ``she`` command line.

Commands: ``demo``, ``inspect``, and the file-based offline flow ``keygen`` ->
``encrypt`` -> ``eval`` -> ``decrypt``. Every command accepts ``--json`` and then prints
exactly one JSON object on stdout. Errors are printed as one line (or a JSON object with
an ``error`` key) and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from .client import Client
from .errors import DataError, ParameterError, SheError
from .frontend.model import load
from .io import assets
from .io.data import arrange, load_dataset, load_idx_dataset, read_idx
from .pipeline import encrypted_predict
from .plan.compiler import Plan, compile
from .server import Server, session_key_bytes

#: Environment variable holding the API key of ``serve`` and ``predict``.
API_KEY_ENV = "SHE_API_KEY"

#: Calibration samples taken from a data set when compiling from the command line.
CALIBRATION_SAMPLES = 1000


def _add_compile_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="HE-friendly ONNX model")
    p.add_argument("--calibration", metavar="NPZ",
                   help="calibration inputs (.npz with 'images' or 'x', or .npy)")
    p.add_argument("--data", metavar="DIR",
                   help="calibrate on the first 1000 training images of an IDX data set")
    p.add_argument("--scale-bits", type=int, help="log2 of the CKKS scale")
    p.add_argument("--weight-bits", type=int, help="significant bits kept for weights")
    p.add_argument("--security", type=int, default=128, help="security level (128/192/256)")
    p.add_argument("--poly-modulus-degree", type=int, help="force a ring size")
    p.add_argument("--packing", choices=["batch", "single"], default="batch",
                   help="batch: one sample per slot, best throughput (default); "
                        "single: one sample per ciphertext, lowest latency")
    p.add_argument("--scheme", choices=["ckks", "bfv"], default="ckks",
                   help="ckks (default, any depth) or bfv (batch packing: the integer-quantised "
                        "model exactly; refused when its values exceed a 60-bit plaintext modulus)")
    p.add_argument("--input-bits", type=int, default=8, help="BFV: bits of the quantised inputs")
    p.add_argument("--circuit-privacy", type=int, metavar="S",
                   help="CKKS: flood the results' noise to statistical distance 2^-S (costs "
                        "precision, see docs/serving.md; results are re-randomised anyway)")


def _plan(args: argparse.Namespace) -> Plan:
    model = load(args.model)
    calibration = None
    if args.calibration:
        calibration, _ = assets.load_inputs(args.calibration)
    elif args.data:
        calibration = load_idx_dataset(args.data, "train")[0][:CALIBRATION_SAMPLES]
    return compile(model, calibration=calibration, scale_bits=args.scale_bits,
                   weight_bits=args.weight_bits, security=args.security,
                   poly_modulus_degree=args.poly_modulus_degree, packing=args.packing,
                   scheme=args.scheme, input_bits=args.input_bits,
                   circuit_privacy=args.circuit_privacy)


def _inputs(args: argparse.Namespace, shape: tuple[int, ...]) -> np.ndarray:
    path = Path(args.input)
    if path.suffix.lower() in (".png", ".jpg", ".jpeg"):
        x = _image(path, shape)
    elif args.index is not None or "idx" in path.name:
        images = read_idx(path)
        if args.index is not None and not 0 <= args.index < len(images):
            raise DataError(f"--index {args.index} outside 0..{len(images) - 1}")
        sel = images if args.index is None else images[args.index:args.index + 1]
        x = sel.astype(np.float32) / 255.0
    else:
        x, _ = assets.load_inputs(path)
    if x.size % int(np.prod(shape)):
        raise DataError(f"{path}: {x.shape} cannot be read as samples of shape {shape}")
    return x.reshape((-1, *shape))


def _image(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A grayscale image resized to the model's input (pixels scaled to [0, 1])."""
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:
        raise DataError("reading images needs Pillow: pip install 'she[serve]'") from exc
    if len(shape) != 3 or shape[0] != 1:
        raise DataError(f"images need a model input of shape (1, H, W), not {shape}")
    try:
        with Image.open(path) as img:
            gray = img.convert("L").resize((shape[2], shape[1]))
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: not a readable image ({exc})") from exc
    return np.asarray(gray, dtype=np.float32)[None, None] / 255.0


# -- commands -------------------------------------------------------------------------------

def cmd_inspect(args: argparse.Namespace) -> dict[str, Any]:
    plan = _plan(args)
    return {**plan.describe(), "session_key_bytes": session_key_bytes(plan),
            "circuit_privacy_bits": plan.circuit_privacy}


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    model = load(assets.demo_model_path())
    calibration, _ = assets.demo_samples()
    if args.data:
        x, y = load_idx_dataset(args.data, "test")
    else:
        x, y = calibration, assets.demo_samples()[1]
    n = min(args.n, len(x))
    x, y = x[:n], y[:n]
    t = time.perf_counter()
    plan = compile(model, calibration=calibration)
    compile_s = time.perf_counter() - t
    plain = model.run_plain(x)
    _log(args, f"compiled in {compile_s:.1f}s: N={plan.params.poly_modulus_degree}, "
               f"{plan.params.total_bits}-bit modulus, depth {plan.depth}; "
               f"encrypting {n} images...")
    done = [0]

    def progress(k: int) -> None:
        done[0] += k
        _log(args, f"  {done[0]}/{n} images evaluated")

    enc, timings = encrypted_predict(plan, x, progress=progress)
    return {
        "images": n,
        "data": args.data or "shipped samples",
        "plaintext_accuracy": float(np.mean(plain.argmax(1) == y)),
        "encrypted_accuracy": float(np.mean(enc.argmax(1) == y)),
        "agreement": float(np.mean(enc.argmax(1) == plain.argmax(1))),
        "max_abs_logit_error": float(np.abs(enc - plain).max()),
        "encrypted_predictions": enc.argmax(1).tolist(),
        "per_image": timings.per_sample(),
        "batches": timings.batches,
        "keygen_s": timings.keygen,
        "public_context_bytes": timings.public_context_bytes,
        "compile_s": compile_s,
        "poly_modulus_degree": plan.params.poly_modulus_degree,
        "modulus_bits": list(plan.params.modulus_bits),
        "security_bits": plan.params.security,
        "depth": plan.depth,
    }


def cmd_convert(args: argparse.Namespace) -> dict[str, Any]:
    try:
        from converters import convert, save_atomically, search
        from converters.convert import Settings
        from converters.onnx_graph import input_info, load_onnx
        from converters.search import search_settings
    except ImportError as exc:  # pragma: no cover - converters ships with the package
        raise SheError(f"the converter is not installed: {exc}") from exc
    shape = input_info(load_onnx(args.model))[1]
    train = test = None
    if args.data:
        train = load_dataset(args.data, "train", shape, args.scale)
        test = load_dataset(args.data, "test", shape, args.scale)
        if train is None:
            raise DataError(f"{args.data}: no training split found")
    if args.train:
        train = _npz(args.train, shape)
    if args.eval:
        test = _npz(args.eval, shape)
    if train is None and args.calibration:
        train = _npz(args.calibration, shape)
    if train is None:
        raise DataError("give training data: --data DIR (IDX files or image folders), "
                        "--train FILE.npz, or --calibration FILE.npz (unlabelled, with --fast)")
    x, labels = train
    if args.samples:
        x, labels = x[:args.samples], (None if labels is None else labels[:args.samples])
    eval_x, eval_y = test if test is not None else (None, None)
    fixed = {name: getattr(args, name) for name in
             ("degree", "max_pool", "exponent_bits", "pow2_terms") if getattr(args, name)}
    if args.no_pow2:
        fixed["pow2"] = False
    if args.pool_first:
        fixed["pool_first"] = True
    progress = True  # on stderr (stdout keeps the one JSON object of --json)
    if args.fast or labels is None:
        if not args.fast:
            _log(args, "no labels: one-shot conversion without fine-tuning (as --fast)")
        if args.fast and args.calibration_samples:
            x = x[:args.calibration_samples]
            labels = None if labels is None else labels[:args.calibration_samples]
        settings = Settings(**fixed)
        proto, report = convert(args.model, x, calibration_labels=labels, eval_x=eval_x,
                                eval_y=eval_y, degree=settings.degree, pow2=settings.pow2,
                                exponent_bits=settings.exponent_bits,
                                pow2_terms=settings.pow2_terms,
                                finetune_epochs=args.finetune_epochs or 0, finetune_lr=args.lr,
                                pool_first=settings.pool_first, max_pool=settings.max_pool,
                                progress=progress)
    else:
        proto, report = search(args.model, x, labels, test_x=eval_x, test_y=eval_y,
                               max_drop=args.max_drop, budget=args.budget, seed=args.seed,
                               settings=[search_settings(**fixed)] if fixed else None,
                               progress=progress)
    save_atomically(proto, args.output)
    return {"output": args.output, **report.as_dict()}


def _npz(path: str, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray | None]:
    x, y = assets.load_inputs(path)
    return arrange(x, shape), y


def cmd_keygen(args: argparse.Namespace) -> dict[str, Any]:
    plan = _plan(args)
    client = Client(plan.spec())
    client.save(args.secret)
    public = client.public_context()
    Path(args.public).write_bytes(public)
    return {"secret_key_file": args.secret, "public_context_file": args.public,
            "public_context_bytes": len(public), "fingerprint": client.fingerprint}


def cmd_encrypt(args: argparse.Namespace) -> dict[str, Any]:
    client = Client.load(args.key)
    x = _inputs(args, tuple(client.spec["input_shape"]))
    data = client.encrypt(x)
    Path(args.output).write_bytes(data)
    return {"samples": len(x), "output": args.output, "bytes": len(data)}


def cmd_eval(args: argparse.Namespace) -> dict[str, Any]:
    server = Server(_plan(args))
    keys = server.load_context(_read(args.context))
    t = time.perf_counter()
    result = server.evaluate(keys, _read(args.input))
    elapsed = time.perf_counter() - t
    Path(args.output).write_bytes(result)
    return {"output": args.output, "bytes": len(result), "evaluate_s": elapsed}


def cmd_decrypt(args: argparse.Namespace) -> dict[str, Any]:
    client = Client.load(args.key)
    return _classify(client.decrypt_outputs(_read(args.input)))


def cmd_serve(args: argparse.Namespace) -> dict[str, Any]:
    from .serve.service import ServiceConfig, default_key_memory, serve

    if args.replicas is not None and args.ray is None:
        raise SheError("--replicas needs --ray (replicas are Ray Serve replicas)")
    if args.replicas is not None and args.replicas < 1:
        raise SheError("--replicas must be at least 1")
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        raise ParameterError("--ssl-certfile and --ssl-keyfile go together")
    if args.ray is not None:
        from .serve.ray_batch import require_ray

        require_ray()  # before any work
    plans = []
    for path in args.model:
        plan = _plan(argparse.Namespace(**{**vars(args), "model": path}))
        plans.append(plan)
        _log(args, f"serving {plan.model_name}: N={plan.params.poly_modulus_degree}, "
                   f"depth {plan.depth}, fingerprint {plan.params.fingerprint()}, "
                   f"{session_key_bytes(plan) / 2**20:.1f} MiB of keys per session")
    key_memory = (int(args.max_key_memory_mb * 2**20) if args.max_key_memory_mb
                  else default_key_memory())
    config = ServiceConfig(session_ttl=args.session_ttl, max_sessions=args.max_sessions,
                           max_body_bytes=args.max_body_mb * 1024 * 1024,
                           api_keys=_api_keys(args), max_key_memory=key_memory,
                           workers=args.workers, queue=args.queue,
                           queue_timeout=args.queue_timeout, job_timeout=args.job_timeout,
                           rate_limit=args.rate_limit, rate_burst=args.rate_burst,
                           read_timeout=args.read_timeout)
    if args.ray is not None:
        from .serve.ray_serve import serve_forever

        replicas = args.replicas or 1
        _log(args, f"Ray Serve: {replicas} replica(s) on "
                   f"{args.ray or 'an embedded local Ray instance'}, http://{args.host}:{args.port}")
        serve_forever(plans, config, host=args.host, port=args.port, replicas=replicas,
                      address=args.ray or None)
    else:
        serve({p.model_name: Server(p, workers=args.workers) for p in plans}, args.host,
              args.port, config, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile)
    return {"stopped": True}


def _api_keys(args: argparse.Namespace) -> tuple[str, ...]:
    """The API keys ``serve`` accepts: ``--api-key`` (repeatable; visible in the process
    list, hence the warning), ``--api-key-file`` (one per line) and the environment
    variables ``SHE_API_KEY`` (one key) and ``SHE_API_KEYS`` (comma-separated)."""
    keys = list(args.api_key or [])
    if keys:
        print("she: warning: --api-key is visible in the process list; prefer "
              f"{API_KEY_ENV} or --api-key-file", file=sys.stderr)
    if args.api_key_file:
        try:
            text = Path(args.api_key_file).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read the API key file {args.api_key_file}: {exc}") from exc
        file_keys = [line.strip() for line in text.splitlines() if line.strip()]
        if not file_keys:
            raise DataError(f"the API key file {args.api_key_file} is empty")
        keys += file_keys
    keys.append(os.environ.get(API_KEY_ENV, ""))
    keys += os.environ.get("SHE_API_KEYS", "").split(",")
    return tuple(dict.fromkeys(k.strip() for k in keys if k.strip()))


def cmd_batch(args: argparse.Namespace) -> dict[str, Any]:
    from .serve.ray_batch import ray_connection, require_ray, score

    require_ray()  # before any work
    plan = _plan(args)
    x = _inputs(args, tuple(plan.input_shape))
    if args.limit is not None:
        x = x[:args.limit]
    with ray_connection(args.ray):
        report = score(plan, x, args.output, chunk_size=args.chunk_size,
                       max_in_flight=args.max_in_flight, max_retries=args.max_retries,
                       progress=True)
    return {**report.as_dict(), "faults": report.summary(),
            "logits": str(Path(args.output) / "logits.npy"),
            "predictions": str(Path(args.output) / "predictions.npy")}


def cmd_predict(args: argparse.Namespace) -> dict[str, Any]:
    from .serve.remote import RemoteClient

    remote = RemoteClient(args.server, args.model, api_key=_api_key(args),
                          key_dir=args.key_dir)
    x = _inputs(args, tuple(remote.spec["input_shape"]))
    t = time.perf_counter()
    outputs = remote.predict_outputs(x)
    elapsed = time.perf_counter() - t
    return {**_classify(outputs), "seconds": elapsed, "server": args.server, "model": args.model}


def _api_key(args: argparse.Namespace) -> str | None:
    """The API key: from ``--api-key-file``, else ``--api-key`` (visible to every user in
    the process list, hence the warning), else the ``SHE_API_KEY`` environment variable."""
    if args.api_key_file:
        if args.api_key:
            raise SheError("give --api-key or --api-key-file, not both")
        try:
            key = Path(args.api_key_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read the API key file {args.api_key_file}: {exc}") from exc
        if not key:
            raise DataError(f"the API key file {args.api_key_file} is empty")
        return key
    if args.api_key:
        print("she: warning: --api-key is visible in the process list; prefer "
              f"{API_KEY_ENV} or --api-key-file", file=sys.stderr)
        return args.api_key
    return os.environ.get(API_KEY_ENV) or None


def _classify(outputs: dict[str, Any]) -> dict[str, Any]:
    """Predictions and probabilities from a client's decrypted outputs: the logits (softmax
    computed here), or the original model's outputs re-applied by its tail (its label
    output, if any, gives the predictions)."""
    if "logits" in outputs and len(outputs) == 1:
        logits = outputs["logits"]
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        probs = shifted / shifted.sum(axis=1, keepdims=True)
        return {"predictions": logits.argmax(1).tolist(),
                "probabilities": np.round(probs, 4).tolist(),
                "logits": np.round(logits, 4).tolist()}
    result: dict[str, Any] = {"outputs": {}}
    for name, value in outputs.items():
        if isinstance(value, np.ndarray):
            value = np.round(value, 4) if value.dtype.kind == "f" else value
            result["outputs"][name] = value.tolist()
            if value.ndim == 1 and "predictions" not in result:
                result["predictions"] = value.tolist()
            elif value.ndim == 2 and "probabilities" not in result:
                result["probabilities"] = value.tolist()
        else:  # ZipMap: one {class: probability} dict per sample
            result["outputs"][name] = [{str(k): round(float(v), 4) for k, v in row.items()}
                                       for row in value]
    if "predictions" not in result and "probabilities" in result:
        result["predictions"] = np.argmax(result["probabilities"], axis=1).tolist()
    return result


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror}") from exc


def _log(args: argparse.Namespace, text: str) -> None:
    print(text, file=sys.stderr if args.json else sys.stdout, flush=True)


def _print_human(command: str, result: dict[str, Any]) -> None:
    if command == "convert":
        for stage in result["stages"]:
            acc = "n/a" if stage["accuracy"] is None else f"{stage['accuracy']:.2%}"
            agree = "" if stage["agreement"] is None else f", agreement {stage['agreement']:.2%}"
            print(f"{stage['name']:<45} accuracy {acc}{agree}")
        for option in result["degree_options"]:
            acc = "" if option["accuracy"] is None else f", accuracy {option['accuracy']:.2%}"
            chosen = " (chosen)" if option["degree"] == result["degree"] else ""
            print(f"  degree {option['degree']}: depth {option['depth']}, fit rmse "
                  f"{option['fit_rmse']:.4f}{acc}{chosen}")
        search = result.get("search")
        if search:
            from converters.search import trial_line

            print(f"settings tried (validation split of {search['validation_samples']}, original "
                  f"{search['original_val_accuracy']:.2%}, target drop <= "
                  f"{search['max_drop_points']} points):")
            for i, trial in enumerate(search["trials"]):
                mark = " (chosen)" if i == search["chosen"] else ""
                print(f"  [{i + 1}] {trial_line(trial)}, {trial['seconds']:.0f} s{mark}")
            print(f"chosen: {search['reason']} ({search['seconds']:.0f} s in all)")
            print(f"latencies {search['latency_model']}")
        if result.get("tail_outputs"):
            print(f"removed from the encrypted part, re-applied by the client after "
                  f"decryption: the computation of {', '.join(result['tail_outputs'])}")
        params = result["parameters"]
        print(f"depth {result['depth']}; N={params['poly_modulus_degree']}, modulus bits "
              f"{params['modulus_bits']}, {params['security_bits']}-bit security")
        print(f"written to {result['output']}")
    elif command == "demo":
        p = result["per_image"]
        print(f"images                 {result['images']} ({result['data']})")
        print(f"plaintext accuracy     {result['plaintext_accuracy']:.2%}")
        print(f"encrypted accuracy     {result['encrypted_accuracy']:.2%}")
        print(f"agreement              {result['agreement']:.2%}")
        print(f"max |logit error|      {result['max_abs_logit_error']:.2e}")
        print(f"per image (amortised)  encrypt {p['encrypt_ms']:.2f} ms, evaluate "
              f"{p['evaluate_ms']:.2f} ms, decrypt {p['decrypt_ms']:.3f} ms")
        print(f"parameters             N={result['poly_modulus_degree']}, modulus bits "
              f"{result['modulus_bits']}, {result['security_bits']}-bit security, "
              f"depth {result['depth']}")
    elif command == "batch":
        print(f"{result['samples']} samples in {result['chunks']} chunks of {result['chunk_size']} "
              f"({result['skipped_chunks']} already done) in {result['seconds']:.1f} s on "
              f"{result['cluster_cpus']} Ray CPUs; {result['faults']}")
        print(f"logits       {result['logits']}")
        print(f"predictions  {result['predictions']}")
    elif command == "inspect":
        r = result
        print(f"model {r['model']}: scheme {r['scheme']}, packing {r['packing']}, depth {r['depth']}")
        print(f"ring size N={r['poly_modulus_degree']} ({r['slots']} slots), modulus bits "
              f"{r['modulus_bits']} = {r['total_modulus_bits']} "
              f"(<= {r['max_modulus_bits_for_ring']} for {r['security_bits']}-bit security)")
        if r["plain_modulus_bits"]:
            print(f"BFV plaintext modulus: {r['plain_modulus_bits']} bits (from range analysis)")
        print(f"input scale 2^{r['input_scale_log2']}, predicted max output error "
              f"{r['predicted_max_output_error']:.2e}")
        for layer in r["layers"]:
            print(f"  layer {layer['index']}: {layer['inputs']} -> {layer['outputs']} "
                  f"({layer['nonzero_weights']} weights, shift {layer['weight_shift']}, "
                  f"{'exact' if layer['exact_weights'] else 'rounded'}), then "
                  f"{layer['activation']}; {layer['input_limbs']} limbs in, "
                  f"scale 2^{layer['log2_scale_out']} out")
        b = r["estimated_bytes"]
        print(f"sizes: fresh ciphertext {b['ciphertext_fresh']:,} B, relin keys "
              f"{b['relin_keys']:,} B, Galois keys {b['galois_keys']:,} B, upload per request "
              f"{b['upload_per_request']:,} B (keys seeded, single-packing inputs compact, "
              f"the rest uncompressed)")
        print(f"server memory per session (keys expanded): {r['session_key_bytes'] / 2**20:.1f} "
              f"MiB; results re-randomised"
              + (f", noise flooded to 2^-{r['circuit_privacy_bits']}"
                 if r["circuit_privacy_bits"] is not None else ""))
        if r["galois_steps"]:
            print(f"single packing: {r['rotations']} rotations per sample, Galois steps "
                  f"{r['galois_steps']}")
        for note in r["notes"]:
            print(f"note: {note}")
    else:
        for key, value in result.items():
            print(f"{key}: {value}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="she", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="offline encrypted MNIST demo on the shipped model")
    p.add_argument("--n", type=int, default=300, help="number of test images (default 300)")
    p.add_argument("--data", metavar="DIR", help="read MNIST IDX files from DIR instead")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("convert", help="convert a trained ONNX model into an HE-friendly one",
                       description="By default the converter fine-tunes on the labelled "
                       "training data and searches its settings until the accuracy drop on a "
                       "validation split is within --max-drop, or --budget runs out.")
    p.add_argument("model", help="trained ONNX model (opset 13-21)")
    p.add_argument("-o", "--output", required=True, help="where to write the HE-friendly model")
    p.add_argument("--data", metavar="DIR", help="data set: MNIST-style IDX files, or images in "
                   "class folders (DIR/train/<class>/, DIR/test/<class>/); trains on the "
                   "training split, reports on the test split")
    p.add_argument("--train", metavar="NPZ", help="labelled training data (.npz: x, y)")
    p.add_argument("--eval", metavar="NPZ", help="test inputs and labels (.npz), reported only")
    p.add_argument("--calibration", metavar="NPZ", help="unlabelled inputs (.npz/.npy): a "
                   "one-shot conversion without fine-tuning")
    p.add_argument("--scale", type=float, default=1 / 255,
                   help="factor applied to image pixels (default 1/255: pixels in [0, 1])")
    p.add_argument("--max-drop", type=float, default=0.5,
                   help="accuracy drop target in points on the validation split (default 0.5)")
    p.add_argument("--budget", type=float, default=540.0,
                   help="seconds for the settings search (default 540)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and fine-tuning")
    p.add_argument("--samples", type=int, help="use only the first N training samples")
    p.add_argument("--fast", action="store_true", help="one-shot conversion with the given "
                   "settings (no search; fine-tuning only with --finetune-epochs)")
    p.add_argument("--calibration-samples", type=int, default=10000,
                   help="--fast: calibration samples (default 10000)")
    p.add_argument("--degree", type=int, choices=(2, 3, 4),
                   help="activation polynomial degree: 2 costs one multiplicative level per "
                   "activation, 3 and 4 cost two (default: searched, or 2 with --fast)")
    p.add_argument("--max-pool", choices=("average", "polynomial"),
                   help="MaxPool as AveragePool (no depth) or as a fitted polynomial maximum "
                   "(two levels for a 2x2 window); default: searched, or average with --fast")
    p.add_argument("--no-pow2", action="store_true", help="keep float weights")
    p.add_argument("--exponent-bits", type=int)
    p.add_argument("--pow2-terms", type=int, choices=(1, 2, 3),
                   help="powers of two per weight (2: two shifts per weight, less rounding; "
                   "default 2 as the search's settings, 1 with --fast)")
    p.add_argument("--finetune-epochs", type=int,
                   help="--fast: distillation epochs against the original (needs torch)")
    p.add_argument("--lr", type=float, default=1e-3, help="--fast: fine-tuning learning rate")
    p.add_argument("--pool-first", action="store_true",
                   help="move MaxPool ahead of its activation: 4x fewer squares, some accuracy")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("inspect", help="print the compiled plan of a model")
    _add_compile_options(p)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("keygen", help="generate keys for a model (secret key stays local)")
    _add_compile_options(p)
    p.add_argument("--secret", required=True, help="where to write the secret key file")
    p.add_argument("--public", required=True, help="where to write the public context")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("encrypt", help="encrypt inputs with a secret key file")
    p.add_argument("--key", required=True, help="secret key file from `she keygen`")
    p.add_argument("input", help=".npy/.npz inputs, or an IDX image file")
    p.add_argument("--index", type=int, help="with an IDX file: encrypt only this image")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=cmd_encrypt)

    p = sub.add_parser("eval", help="evaluate a model on encrypted inputs (server side)")
    _add_compile_options(p)
    p.add_argument("--context", required=True, help="public context from `she keygen`")
    p.add_argument("input", help="ciphertexts from `she encrypt`")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("decrypt", help="decrypt a result with the secret key file")
    p.add_argument("--key", required=True)
    p.add_argument("input")
    p.set_defaults(func=cmd_decrypt)

    p = sub.add_parser("serve", help="serve models over HTTP (MLaaS)")
    _add_compile_options(p)
    p.add_argument("more_models", nargs="*", metavar="MODEL", help="further models")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", action="append",
                   help="require this X-API-Key header (repeatable; sessions are bound to "
                        "the key that made them; visible in the process list: prefer "
                         f"{API_KEY_ENV}, SHE_API_KEYS or --api-key-file)")
    p.add_argument("--api-key-file", help="file with accepted API keys, one per line")
    p.add_argument("--session-ttl", type=float, default=3600.0, help="seconds (default 3600)")
    p.add_argument("--max-sessions", type=int, default=64)
    p.add_argument("--max-key-memory-mb", type=float,
                   help="memory for all sessions' keys; the least recently used sessions are "
                        "evicted past it (default: a quarter of the machine's memory)")
    p.add_argument("--max-body-mb", type=int, default=1024, help="request body cap (MiB)")
    p.add_argument("--workers", type=int,
                   help="HE processes at once, over all requests (default: all cores)")
    p.add_argument("--ray", nargs="?", const="", metavar="ADDRESS",
                   help="run as a Ray Serve application (needs she[ray]) on the cluster at "
                        "ADDRESS, or on an embedded local Ray instance without one")
    p.add_argument("--replicas", type=int,
                   help="with --ray: service replicas, one CPU each (default 1)")
    p.add_argument("--queue", type=int, default=64,
                   help="requests waiting for a worker before 503 (default 64)")
    p.add_argument("--queue-timeout", type=float, default=120.0,
                   help="seconds a request waits for a worker before 503 (default 120)")
    p.add_argument("--job-timeout", type=float, default=900.0,
                   help="seconds one evaluation may take before 503 (default 900)")
    p.add_argument("--rate-limit", type=float, default=20.0,
                   help="requests per second per API key or client address, 0: off "
                        "(default 20)")
    p.add_argument("--rate-burst", type=int, default=40, help="burst allowance (default 40)")
    p.add_argument("--read-timeout", type=float, default=30.0,
                   help="seconds without request data before 408 (default 30)")
    p.add_argument("--ssl-certfile", help="serve HTTPS with this certificate (PEM)")
    p.add_argument("--ssl-keyfile", help="the certificate's private key (PEM)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("batch", help="score a whole data set encrypted, chunks as Ray tasks "
                       "(needs she[ray]; resumable)")
    _add_compile_options(p)
    p.add_argument("input", help=".npy/.npz inputs, or an IDX image file")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="output directory: logits.npy and predictions.npy in input order, "
                        "one file per chunk (a rerun skips the chunks already there)")
    p.add_argument("--ray", metavar="ADDRESS",
                   help="Ray cluster to run on (default: an embedded local instance)")
    p.add_argument("--chunk-size", type=int,
                   help="samples per chunk (default: one full ciphertext batch)")
    p.add_argument("--limit", type=int, help="score only the first N samples")
    p.add_argument("--max-in-flight", type=int,
                   help="chunks encrypted ahead of the results (default: 2 per cluster CPU)")
    p.add_argument("--max-retries", type=int, default=3,
                   help="Ray retries of a chunk whose node or worker died (default 3)")
    p.set_defaults(func=cmd_batch, index=None)

    p = sub.add_parser("predict", help="encrypted prediction from a `she serve` server")
    p.add_argument("--server", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", required=True, help="model name (GET /v1/models)")
    p.add_argument("input", help=".png/.jpg image, .npy/.npz array, or IDX file")
    p.add_argument("--index", type=int, help="with an IDX file: only this image")
    p.add_argument("--api-key", help="X-API-Key for the server (visible in the process list: "
                                     f"prefer {API_KEY_ENV} or --api-key-file)")
    p.add_argument("--api-key-file", help="read the X-API-Key from this file")
    p.add_argument("--key-dir", help="key cache directory (default ~/.cache/she/keys)")
    p.set_defaults(func=cmd_predict)

    for sp in sub.choices.values():
        sp.add_argument("--json", action="store_true", help="print one JSON summary")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        if argv is None:  # the command line, not an embedding: cheap forks (she.serve.workers)
            from .serve.workers import reexec_with_huge_pages

            reexec_with_huge_pages()
        args.model = [args.model, *args.more_models]
    try:
        result = args.func(args)
    except SheError as exc:
        if args.json:
            print(json.dumps({"error": str(exc), "type": type(exc).__name__}))
        else:
            print(f"she {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        _print_human(args.command, result)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
