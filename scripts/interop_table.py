"""Print, per committed interop fixture, how far traitsae's encode/decode are from the library's
own (max |difference| on the fixtures' batch): the table in docs/guide/interop.md.

    PYTHONPATH=src:tests .venv/bin/python scripts/interop_table.py
"""

from test_interop_formats import MANIFEST, fixture_diffs

print("| fixture | library, version | library's variant | codes | decode |")
print("| --- | --- | --- | --- | --- |")
for entry in MANIFEST["fixtures"]:
    codes, recon = fixture_diffs(entry["name"])
    print(
        f"| {entry['name']} | {entry['library']} {entry['version']} | {entry['variant']} "
        f"| {codes:.1e} | {recon:.1e} |"
    )
for variant, diffs in (MANIFEST.get("saev_load_of_traitsae_export") or {}).items():
    print(
        f"| traitsae {variant} exported, read by saev's `load` | saev (source) | {variant} "
        f"| {diffs['max_abs_diff_codes']:.1e} | {diffs['max_abs_diff_recon']:.1e} |"
    )
