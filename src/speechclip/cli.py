"""`speechclip demo | data build | train | eval | embed | keywords | index | search | serve`.

A thin layer: each command parses its arguments and calls one library or training function."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .quiet import quiet_libraries


def cmd_data_build(args) -> None:
    from .data.synthetic import CorpusSpec, build_corpus

    given = {"num_scenes": args.scenes, "num_clipart": args.clipart, "captions_per_image": args.captions,
             "train_voices": args.train_voices, "val_images": args.val_images, "test_images": args.test_images, "seed": args.seed}
    spec = CorpusSpec(**{field: value for field, value in given.items() if value is not None})  # the rest: CorpusSpec's defaults
    print(json.dumps(build_corpus(args.out, spec, workers=args.workers), indent=2))


def cmd_train(args) -> None:
    from .train.config import load_run_config
    from .train.run import fit

    config = load_run_config(args.config, args.set)
    summary = fit(config, args.run_dir, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
    print(json.dumps(summary, indent=2))


def _run_config_for(checkpoint: Path, config: str | None, overrides: list[str]):
    from .config import ConfigError
    from .train.config import check_data_config, load_run_config

    if config is None:
        candidate = checkpoint.parent / "run.yaml"
        if not candidate.is_file():
            raise ConfigError(f"{checkpoint}: not inside a run folder (no run.yaml beside it); give --config with the "
                              "run's YAML (its data section names the dataset)")
        config = str(candidate)
    run_config = load_run_config(config, overrides)
    check_data_config(run_config.data)  # the data section, as `train` checks it
    return run_config


def cmd_eval(args) -> None:
    from .evaluate import format_table
    from .train.config import check_train_config
    from .checkpoint import model_folder
    from .train.run import evaluate_checkpoint

    checkpoint = model_folder(args.checkpoint)  # a run folder means its final/
    config = _run_config_for(checkpoint, args.config, args.set)
    check_train_config(config.train)  # eval_batch_size, cache settings: eval runs through the training layer
    out = args.out or checkpoint / f"eval_{args.split}.json"
    result = evaluate_checkpoint(checkpoint, config, args.split, out)  # checks `out` before any work
    print(format_table(result))
    skipped = result["skipped"]
    if skipped["count"]:
        reasons = ", ".join(f"{reason}: {count}" for reason, count in skipped["reasons"].items())
        print(f"skipped {skipped['count']} clip(s) of the {args.split} split (data.on_error=skip; {reasons}); "
              f"listed under 'skipped' in {out}")
    print(f"written: {out}")


def cmd_embed(args) -> None:
    from .checkpoint import model_folder
    from .embed import embed_collection, read_manifest as read_embeddings
    from .data import read_dataset, read_manifest
    from .model import SpeechCLIP

    if args.manifest:  # the manifest is the whole collection: a split or data config given beside it would be ignored
        beside = [flag for flag, value in (("--split", args.split), ("--config", args.config), ("--set", args.set)) if value]
        if beside:
            raise ValueError(f"{', '.join(beside)}: not used with --manifest (it lists every clip to embed); give one or the other")
    checkpoint = model_folder(args.checkpoint)  # a run folder means its final/
    model = SpeechCLIP.from_pretrained(checkpoint)
    if args.manifest:
        items = read_manifest(args.manifest)
    else:
        config = _run_config_for(checkpoint, args.config, args.set)
        items = read_dataset(config.data.kind, config.data.root, args.split or "test", **config.data.options)
    what, out = args.what.split(","), Path(args.out)
    distributed = {"accelerator": args.accelerator, "devices": args.devices, "num_nodes": args.num_nodes, "strategy": args.strategy}
    if any(value is not None for value in distributed.values()):  # Lightning: several GPUs or nodes
        from .train.embed_job import run_embed_job

        given = {k: (int(v) if k == "num_nodes" or (k == "devices" and v.isdigit()) else v) for k, v in distributed.items() if v is not None}
        manifest = run_embed_job(model, items, out, what, batch_size=args.batch_size, shard_size=args.shard_size,
                                 workers=args.workers, progress=not args.no_progress, **given)
    else:
        manifest = embed_collection(model, items, out, what, batch_size=args.batch_size, shard_size=args.shard_size,
                                    progress=not args.no_progress)
    if manifest is not None:  # under Lightning's ddp launcher, rank 0 writes and reports it
        kinds = read_embeddings(out)["kinds"]
        print(json.dumps({"manifest": str(manifest), "kinds": {k: v["count"] for k, v in kinds.items()}}, indent=2))


def _check_query_clip(path: str, max_seconds: float | None) -> None:
    """Decode a query clip before the model loads, so a bad one is named in a second; refuse one over
    `max_seconds` (default: `audio.MAX_QUERY_SECONDS`), which is encoded whole (memory grows with its length)."""
    from .audio import MAX_QUERY_SECONDS, SAMPLE_RATE, load_audio

    max_seconds = MAX_QUERY_SECONDS if max_seconds is None else max_seconds
    if not max_seconds > 0:
        raise ValueError(f"--max-audio-seconds {max_seconds:g}: must be more than 0")
    samples = load_audio(path).size
    if samples > max_seconds * SAMPLE_RATE:
        raise ValueError(f"{path}: {samples / SAMPLE_RATE:.1f} s of audio, over the {max_seconds:g} s limit "
                         "(--max-audio-seconds; a clip is encoded whole)")


def cmd_keywords(args) -> None:
    from .checkpoint import model_folder
    from .model import SpeechCLIP

    checkpoint = model_folder(args.checkpoint)
    for path in args.audio:
        _check_query_clip(path, args.max_audio_seconds)
    model = SpeechCLIP.from_pretrained(checkpoint)
    for path, slots in zip(args.audio, model.keywords(args.audio, top_k=args.top_k)):
        print(path)
        for number, slot in enumerate(slots, start=1):
            print(f"  keyword {number}: " + "  ".join(f"{word} ({score:.2f})" for word, score in slot))


def cmd_convert(args) -> None:
    from .convert import convert_checkpoint

    folder = convert_checkpoint(args.checkpoint, args.out, overwrite=args.overwrite)
    report = json.loads((folder / "conversion.json").read_text())
    print(f"{report['variant']} model converted to {folder} (load it with SpeechCLIP.from_pretrained({str(folder)!r}))")


def cmd_demo(args) -> None:
    from .demo import run_demo

    run_demo(Path(args.out), quick=args.quick, fresh=args.fresh, retrain=args.retrain, seed=args.seed, plus=args.plus,
             check=not args.no_check, fp32=args.fp32, pretrain=args.pretrain)


def cmd_index(args) -> None:
    from .index import build_index_from_embeddings

    given = {"nlist": args.nlist, "nprobe": args.nprobe, "m": args.m, "refine": args.refine}
    options = {k: v for k, v in given.items() if v is not None}
    index = build_index_from_embeddings(Path(args.embeddings), Path(args.out), kind=args.kind, what=args.what, **options)
    print(f"index of {index.size} vectors ({index.kind}) written to {args.out}")


def cmd_search(args) -> None:
    from .checkpoint import model_folder
    from .index import EmbeddingIndex
    from .model import SpeechCLIP

    given = {"--audio": args.audio, "--text": args.text, "--image": args.image}
    empty = [flag for flag, value in given.items() if value is not None and not value.strip()]
    if empty:
        raise ValueError(f"{empty[0]}: empty")
    if args.k < 1:
        raise ValueError(f"-k {args.k}: must be at least 1")
    if args.audio is not None:
        _check_query_clip(args.audio, args.max_audio_seconds)
    checkpoint = model_folder(args.checkpoint)
    index = EmbeddingIndex.load(Path(args.index))
    model = SpeechCLIP.from_pretrained(checkpoint)
    index.check_query_model(model)
    if args.audio is not None:
        query = model.encode_speech([args.audio])
    elif args.text is not None:
        query = model.encode_text([args.text])
    else:
        query = model.encode_image([args.image])
    for rank, (item_id, score) in enumerate(index.search(query.numpy(), args.k)[0], start=1):
        print(f"{rank:3d}. {score:.3f}  {item_id}")


def cmd_serve(args) -> None:
    from .checkpoint import model_folder
    from .serve.run import Sources, demo_sources, serve
    from .serve.search import Limits

    if args.checkpoint is None and args.images is None:
        sources = demo_sources()  # the finished demo, or one line naming `speechclip demo`
    elif args.checkpoint is None or args.images is None:
        raise SystemExit("speechclip serve: give both --checkpoint and --images (or neither, for the demo)")
    else:
        sources = Sources(model_folder(args.checkpoint), Path(args.images), Path(args.clips) if args.clips else None)
    audio = {} if args.max_audio_seconds is None else {"max_audio_seconds": args.max_audio_seconds}  # else Limits' default
    limits = Limits(max_upload_mb=args.max_upload_mb, workers=args.workers, queue=args.queue, **audio)
    serve(sources, host=args.host, port=args.port, limits=limits, cache=Path(args.cache) if args.cache else None)


CHECKPOINT_HELP = "a SpeechCLIP folder (config.json + model.safetensors), a file in it, or a run folder (its final/)"
QUERY_SECONDS_HELP = "refuse longer clips, which are encoded whole (default: 60, audio.MAX_QUERY_SECONDS)"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="speechclip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="offline end-to-end run: corpus, mini encoders, SpeechCLIP, table")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--quick", action="store_true", help="a seconds-long miniature (what the tests run)")
    demo.add_argument("--fresh", action="store_true", help="rebuild the corpus, encoders and SpeechCLIP runs")
    demo.add_argument("--pretrain", action="store_true",
                      help="pre-train the mini CLIP and mini HuBERT from nothing instead of taking the released ones "
                           "(what they were built with; about 5 more minutes)")
    demo.add_argument("--retrain", action="store_true", help="reuse corpus and encoders, train SpeechCLIP again")
    demo.add_argument("--seed", type=int, default=0,
                      help="another draw of every training run on the same corpus (0: the default build; another "
                           "seed pre-trains its own mini encoders); "
                           "with --out elsewhere, to measure the spread of the results")
    demo.add_argument("--plus", action="store_true",
                      help="also train SpeechCLIP+'s hybrid_plus (CIF keywords) and add its line to the table")
    demo.add_argument("--no-check", action="store_true", help="start even with less free memory or disk than it needs")
    demo.add_argument("--fp32", action="store_true",
                      help="compute in fp32 even where the CPU has bf16 units, as a CPU without them does; "
                           "with --out elsewhere (a build in the other arithmetic is trained again in place)")
    demo.set_defaults(func=cmd_demo)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    build = data.add_parser("build", help="build the offline spoken-caption corpus")
    build.add_argument("--out", required=True)
    # unset sizes take CorpusSpec's defaults (the demo's corpus)
    build.add_argument("--scenes", type=int)
    build.add_argument("--clipart", type=int)
    build.add_argument("--captions", type=int, help="captions per image")
    build.add_argument("--train-voices", type=int, help="training speakers per training caption")
    build.add_argument("--val-images", type=int)
    build.add_argument("--test-images", type=int)
    build.add_argument("--seed", type=int)
    build.add_argument("--workers", type=int, help="synthesis threads (default: usable cores + 2)")
    build.set_defaults(func=cmd_data_build)

    train = sub.add_parser("train", help="train a SpeechCLIP model from a YAML config")
    train.add_argument("--config", required=True)
    train.add_argument("--run-dir", required=True)
    train.add_argument("--resume", action="store_true",
                       help="continue the run in run-dir from checkpoints/last.ckpt (starts it if there is none yet)")
    train.add_argument("--overwrite", action="store_true", help="replace the run in run-dir (deleted once the new one starts)")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    train.add_argument("--no-progress", action="store_true")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("eval", help="retrieval and keyword tables for a checkpoint")
    evaluate.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    evaluate.add_argument("--config", help="run YAML with the data section (default: run.yaml beside the checkpoint)")
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument("--out", help="the JSON file to write (default: eval_SPLIT.json in the checkpoint folder)")
    evaluate.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    evaluate.set_defaults(func=cmd_eval)

    embed = sub.add_parser("embed", help="write speech/image/text embeddings with their ids, in resumable shards")
    embed.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    embed.add_argument("--manifest", help="a JSONL/CSV manifest (else the run config's split)")
    embed.add_argument("--config", help="run YAML with the data section (default: run.yaml beside the checkpoint)")
    embed.add_argument("--split", help="the run config's split to embed (default: test)")
    embed.add_argument("--what", default="speech,image,text")
    embed.add_argument("--out", required=True, help="a folder: <kind>-NNNNN.safetensors shards + manifest.json; "
                                                    "rerun the same command to finish an interrupted export")
    embed.add_argument("--batch-size", type=int, default=32)
    embed.add_argument("--shard-size", type=int, default=10_000, help="items per shard file")
    embed.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE")
    embed.add_argument("--no-progress", action="store_true")
    # any of these runs the export through Lightning (as training does): several GPUs or nodes
    embed.add_argument("--accelerator", help="Lightning accelerator (cpu, gpu, auto)")
    embed.add_argument("--devices", help="Lightning devices per node (a count, a list or auto)")
    embed.add_argument("--num-nodes", type=int)
    embed.add_argument("--strategy", help="Lightning strategy (ddp, ddp_spawn, auto)")
    embed.add_argument("--workers", type=int, default=0, help="DataLoader workers reading audio/images (Lightning path)")
    embed.set_defaults(func=cmd_embed)

    convert = sub.add_parser("convert", help="a released SpeechCLIP / SpeechCLIP+ .ckpt -> a self-contained folder")
    convert.add_argument("checkpoint", help="the authors' Lightning checkpoint (read without executing its pickle)")
    convert.add_argument("--out", required=True, help="the folder to write (config.json, model.safetensors, hubert/, clip/)")
    convert.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    convert.set_defaults(func=cmd_convert)

    keywords = sub.add_parser("keywords", help="print the keywords of spoken clips (cascaded/hybrid)")
    keywords.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    keywords.add_argument("--top-k", type=int, default=5)
    keywords.add_argument("--max-audio-seconds", type=float, help=QUERY_SECONDS_HELP)
    keywords.add_argument("audio", nargs="+")
    keywords.set_defaults(func=cmd_keywords)

    index = sub.add_parser("index", help="build a FAISS index from `speechclip embed` output, shard by shard")
    index.add_argument("--embeddings", required=True, help="the folder `speechclip embed` wrote (or an older <kind>.safetensors)")
    index.add_argument("--what", help="speech, image or text (needed when the folder holds several)")
    index.add_argument("--out", required=True)
    index.add_argument("--kind", default="auto", choices=["auto", "flat", "hnsw", "ivf", "ivfpq"],
                       help="auto: exact to 100k vectors, IVF to 1M, IVF-PQ (compressed, 64 B a 512-d vector) above")
    index.add_argument("--nlist", type=int, help="IVF lists (default: ~4 sqrt(N) for ivf, ~sqrt(N) for ivfpq)")
    index.add_argument("--nprobe", type=int, help="IVF lists visited per query")
    index.add_argument("--m", type=int, help="IVF-PQ sub-quantizers (bytes per code; must divide the dimension)")
    index.add_argument("--refine", type=int, help="IVF-PQ candidates re-scored exactly from the embeddings on disk "
                                                  "(default 300; 0: none, the index alone)")
    index.set_defaults(func=cmd_index)

    search = sub.add_parser("search", help="query an index with speech, text or an image")
    search.add_argument("--index", required=True)
    search.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    group = search.add_mutually_exclusive_group(required=True)
    group.add_argument("--audio")
    group.add_argument("--text")
    group.add_argument("--image")
    search.add_argument("-k", type=int, default=10)
    search.add_argument("--max-audio-seconds", type=float, help=QUERY_SECONDS_HELP)
    search.set_defaults(func=cmd_search)

    serve = sub.add_parser("serve", help="search pictures by voice: web page + HTTP API (no arguments: the demo)")
    serve.add_argument("--checkpoint", help=CHECKPOINT_HELP + " (default: the demo's, runs/demo/runs/pretrained/final)")
    serve.add_argument("--images", help="a folder of images, indexed once and cached in DIR/.speechclip")
    serve.add_argument("--clips", help="spoken clips for image -> speech: a folder of audio files or a .jsonl/.csv manifest")
    serve.add_argument("--cache", help="where to keep embeddings, indexes and thumbnails (default: beside the data)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1, help="request threads (model forwards take turns; more threads overlap decoding)")
    serve.add_argument("--queue", type=int, default=32, help="queries that may wait for a worker; beyond: 503")
    serve.add_argument("--max-upload-mb", type=float, default=20.0)
    serve.add_argument("--max-audio-seconds", type=float, help=QUERY_SECONDS_HELP)
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        quiet_libraries()  # imports the libraries it quiets: seconds in which a Ctrl-C must not be a traceback
        args.func(args)
    except (ValueError, FileNotFoundError) as error:  # our errors name the file or field: show them plainly
        print(f"speechclip: error: {error}", file=sys.stderr)
        raise SystemExit(2) from error
    except KeyboardInterrupt as interrupt:  # what is written is whole (shards, checkpoints, caches are renamed into place)
        if args.command == "serve":  # Ctrl-C is how a server is stopped (uvicorn raises it again once shut down)
            print("speechclip serve: stopped", file=sys.stderr)
            raise SystemExit(0) from None
        said = str(interrupt)  # training says at which step, and how to go on (train.run.TrainingInterrupted)
        print(f"speechclip {args.command}: {said}" if said else f"speechclip {args.command}: interrupted{RESUMABLE.get(args.command, '')}",
              file=sys.stderr)
        raise SystemExit(130) from None


# what Ctrl-C leaves that the next run goes on from
RESUMABLE = {"embed": "; the finished shards are kept: run the same command again to go on",
             "demo": "; the finished stages are kept: run it again to go on",
             "data": "; the finished clips and images are kept: run it again to go on"}


if __name__ == "__main__":
    main()
