"""examples/decode_profile.py end to end on a tiny model (no timings asserted)."""

from examples import decode_profile
from ifprune_mlx import testing


def test_profile_prints_every_part_of_every_variant(tmp_path, capsys):
    folder = testing.make_model_folder(tmp_path / "m", dict(testing.model_config("llama"), tie_word_embeddings=True))
    decode_profile.main(["--model", str(folder), "--densities", "0.5", "--repeat", "1"])
    out = capsys.readouterr().out
    for variant in ("ours dense", "mlx-lm dense", "ours 0.5", "mlx-lm small 0.5"):
        for part in ("FFN (all layers)", "attention (all layers)", "output projection", "whole step"):
            assert f"| {variant} | {part} |" in out
    ffn = {line.split("|")[1].strip(): float(line.split("|")[3]) for line in out.splitlines()
           if "| FFN (all layers) |" in line}
    assert ffn["ours 0.5"] == ffn["mlx-lm small 0.5"]  # the bytes of the kept rows
    assert abs(ffn["ours 0.5"] - ffn["ours dense"] / 2) <= 0.1
