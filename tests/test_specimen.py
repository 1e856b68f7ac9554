"""Specimen types decide which stages apply to a slide (`engine.specimen`)."""

import pytest

from engine.specimen import (SpecimenError, Specimens, branches_for, left_out, parse_specimen,
                             slide_stages)

RUN = ["cell_detection", "cell_classification:deepheme-tiny (UNTRAINED)", "differential",
       "tiles", "cellularity:image_analysis", "tile_embedding:dinov2-tiny (UNTRAINED)",
       "cellularity:abmil"]


def test_names_parse_in_any_case_and_blank_is_unknown():
    assert parse_specimen(" Aspirate ") == "aspirate"
    assert parse_specimen("") == parse_specimen(None) == "unknown"
    with pytest.raises(SpecimenError, match=r"list.csv line 3: 'marrow' is not a specimen type; "
                                            r"one of: aspirate \(bone-marrow aspirate smear\)"):
        parse_specimen("marrow", "list.csv line 3")


def test_sections_lose_the_cells_branch_and_smears_keep_both():
    both = ("cells", "tiles")
    assert branches_for("biopsy", both) == branches_for("clot", both) == ("tiles",)
    assert branches_for("aspirate", both) == branches_for("blood", both) == both
    assert branches_for("unknown", both) == both
    assert branches_for("biopsy", ("cells",)) == ()
    # a smear's tiles are read for an encoder's embeddings only
    assert branches_for("blood", both, embeddings=False) == ("cells",)
    assert branches_for("biopsy", both, embeddings=False) == ("tiles",)
    assert branches_for("unknown", both, embeddings=False) == both


@pytest.mark.parametrize("specimen,gone", [
    ("biopsy", ["cell_classification", "cell_detection", "differential"]),
    ("blood", ["cellularity:abmil", "cellularity:image_analysis"]),
    ("unknown", []),
])
def test_each_slide_records_the_stages_its_type_ran(specimen, gone):
    run, skipped = slide_stages(specimen, RUN, ["cellularity:abmil"])
    assert sorted(set(skipped) - {"cellularity:abmil"}) == sorted(set(gone) - {"cellularity:abmil"})
    assert len(run) == len(RUN) - len(gone) and not any(left_out(specimen, s) for s in run)
    assert "tiles" in run and any(s.startswith("tile_embedding") for s in run)


def test_a_smear_without_an_encoder_skips_its_tiles():
    run, skipped = slide_stages("aspirate", ["cell_detection", "tiles",
                                             "cellularity:image_analysis"], [],
                                embeddings=False)
    assert run == ["cell_detection"] and skipped == ["cellularity:image_analysis", "tiles"]
    assert slide_stages("biopsy", ["tiles"], [], embeddings=False)[0] == ["tiles"]


def test_the_input_types_some_slides_and_the_flag_the_rest():
    s = Specimens("aspirate", {"/a.svs": "biopsy", "/c.svs": "unknown"})
    assert s.of("/a.svs") == "biopsy" and s.of("/b.svs") == s.of("/c.svs") == "aspirate"
    assert Specimens().of("/a.svs") == "unknown"


def test_a_list_gives_each_slide_one_type_one_pixel_size_and_one_row(tmp_path, capsys):
    """A slide listed twice runs once (said); listed with two types or two pixel sizes, the
    job is refused naming both lines, where the later row would otherwise win unawares."""
    from engine.config import StorageConfig
    from engine.slides.storage import InputError
    from jobs.common import expand_inputs, read_mpp_table, read_specimens

    storage = StorageConfig()
    (tmp_path / "a.svs").write_bytes(b"x")
    listed = tmp_path / "list.csv"
    listed.write_text("path,specimen\na.svs,blood\nb.svs,\na.svs,blood\n")
    assert [e.uri for e in expand_inputs(str(listed), storage)] == [
        str(tmp_path / "a.svs"), str(tmp_path / "b.svs")]
    assert f"1 slide(s) listed more than once, each taken once: {tmp_path / 'a.svs'}" \
        in capsys.readouterr().err
    assert read_specimens(str(listed), storage) == {str(tmp_path / "a.svs"): "blood"}
    listed.write_text("path,specimen\na.svs,blood\nb.svs,\na.svs,Aspirate\n")
    with pytest.raises(InputError, match=r"list.csv line 4: .*a.svs has specimen type "
                                         r"'aspirate' here and 'blood' on line 2"):
        read_specimens(str(listed), storage)

    table = tmp_path / "mpp.csv"
    table.write_text("path,mpp\na.svs,0.25\nb.svs,\na.svs,0.250\n")
    assert read_mpp_table(str(table), storage) == {str(tmp_path / "a.svs"): 0.25}
    table.write_text("path,mpp\na.svs,0.25\na.svs,0.5\n")
    with pytest.raises(InputError, match="line 3: .*pixel size 0.5 here and 0.25 on line 2"):
        read_mpp_table(str(table), storage)
    for bad in ("abc", "0", "-1", "nan", "72"):  # 72: a DPI, not µm/px
        table.write_text(f"path,mpp\na.svs,{bad}\n")
        with pytest.raises(InputError, match=f"line 2: mpp for .*a.svs: expected µm/px from "
                                             f"0.02 to 50.0 .*got '{bad}'"):
            read_mpp_table(str(table), storage)


def test_an_inventory_gives_each_slide_one_row_type_and_case(tmp_path, capsys):
    """The same rules for a Parquet inventory given as --input (two inventories concatenated,
    say): a slide's first row, a repeat said, two types or two cases refused by row."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from engine.config import StorageConfig
    from engine.slides.storage import InputError
    from jobs.process_slides import read_inputs

    def inventory(specimens, cases):
        path = tmp_path / "slides.parquet"
        pq.write_table(pa.table({"uri": ["/a.svs", "/b.svs", "/a.svs"], "size_bytes": [1, 2, 3],
                                 "etag": ["x", "y", "z"], "specimen": specimens,
                                 "case": cases}), path)
        return read_inputs(str(path), StorageConfig())

    got = inventory(["blood", None, "blood"], ["C1", "C2", None])
    assert [(e.uri, e.size) for e in got.entries] == [("/a.svs", 1), ("/b.svs", 2)]
    assert got.specimens == {"/a.svs": "blood"} and got.cases == {"/a.svs": "C1", "/b.svs": "C2"}
    assert "1 slide(s) listed more than once, each taken once: /a.svs" in capsys.readouterr().err
    with pytest.raises(InputError, match="row 3: /a.svs has specimen type 'aspirate' here and "
                                         "'blood' on row 1"):
        inventory(["blood", None, "aspirate"], [None, None, None])
    with pytest.raises(InputError, match="row 3: /a.svs has case 'C9' here and 'C1' on row 1"):
        inventory([None, None, None], ["C1", None, "C9"])
