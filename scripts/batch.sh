#!/usr/bin/env bash
# Stylize every content image with every style image:
#
#   scripts/batch.sh STYLE_DIR CONTENT_DIR OUT_DIR [style.py batch options]
#
# Images are the files directly in each folder ending in .jpg, .jpeg, .png, .webp, .tif, .tiff or .bmp (any case),
# taken in sorted order. The pairs go to OUT_DIR/manifest.csv, outputs are OUT_DIR/{content}-{style}.jpg (each an
# image's file name without its extension; two images of one folder with the same such name, such as a.jpg and a.png,
# keep their extensions as a-jpg and a-png; an output name still taken twice gets -2, -3, ...), and
# `style.py batch` runs the manifest, so an interrupted or partly failed run picks up where it stopped when started
# again, and a bad image fails only its own jobs. Options after OUT_DIR go to `style.py batch` (style.py's options
# such as -m, -l, -n, -g and the batch's own --workers, --dask-scheduler, --force). The interpreter is $PYTHON,
# else the project's .venv, else python3. Exit codes are those of style.py batch (0 all done, 1 some failed).
set -euo pipefail

usage() {
    echo "usage: $0 STYLE_DIR CONTENT_DIR OUT_DIR [style.py batch options]" >&2
    exit 2
}
[ "$#" -ge 3 ] || usage
style_dir=$1 content_dir=$2 out_dir=$3
shift 3

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python=python3; fi
fi

for dir in "$style_dir" "$content_dir"; do
    [ -d "$dir" ] || { echo "$0: not a folder: $dir" >&2; exit 2; }
done

# Absolute paths of the images in a folder, one per line, sorted the same way in every locale.
list_images() {
    local file name
    for file in "$1"/*; do
        [ -f "$file" ] || continue
        name=${file##*/}
        case "${name,,}" in
            *.jpg | *.jpeg | *.png | *.webp | *.tif | *.tiff | *.bmp)
                printf '%s/%s\n' "$(cd "$(dirname "$file")" && pwd)" "$name" ;;
        esac
    done | LC_ALL=C sort
}

# The name each image gives its outputs, one per line in the order of the arguments: the file name without its
# extension, or with the extension as "-ext" when another image of the list has the same name (case aside, for
# case-insensitive file systems): a.jpg -> a, but a.jpg + a.png -> a-jpg, a-png.
output_stems() {
    local -A count=()
    local path name stem key
    for path in "$@"; do
        name=${path##*/}
        stem=${name%.*}
        key="k:${stem,,}" # the prefix: an associative array takes no empty key
        count[$key]=$((${count[$key]:-0} + 1))
    done
    for path in "$@"; do
        name=${path##*/}
        stem=${name%.*}
        if [ "${count["k:${stem,,}"]}" -gt 1 ]; then
            printf '%s-%s\n' "$stem" "${name##*.}"
        else
            printf '%s\n' "$stem"
        fi
    done
}

# A CSV field: always quoted, inner quotes doubled (paths may hold commas and quotes).
csv_field() {
    local text=${1//\"/\"\"}
    printf '"%s"' "$text"
}

mapfile -t styles < <(list_images "$style_dir")
mapfile -t contents < <(list_images "$content_dir")
[ "${#styles[@]}" -gt 0 ] || { echo "$0: no images in $style_dir" >&2; exit 2; }
[ "${#contents[@]}" -gt 0 ] || { echo "$0: no images in $content_dir" >&2; exit 2; }

mapfile -t style_stems < <(output_stems "${styles[@]}")
mapfile -t content_stems < <(output_stems "${contents[@]}")

mkdir -p "$out_dir"
manifest="$out_dir/manifest.csv"
tmp="$manifest.tmp.$$"
trap 'rm -f "$tmp"' EXIT
# Output names in use, lower-cased: style.py batch rejects a manifest in which two jobs write one file, and
# "a-b" + "c" meets "a" + "b-c".
declare -A taken=()
{
    echo "style,content,output"
    for c in "${!contents[@]}"; do
        for s in "${!styles[@]}"; do
            base="${content_stems[c]}-${style_stems[s]}"
            output="$base.jpg"
            n=1
            while [ -n "${taken["k:${output,,}"]:-}" ]; do
                n=$((n + 1))
                output="$base-$n.jpg"
            done
            taken["k:${output,,}"]=1
            # Outputs are relative to the manifest's folder, which is OUT_DIR.
            printf '%s,%s,%s\n' "$(csv_field "${styles[s]}")" "$(csv_field "${contents[c]}")" "$(csv_field "$output")"
        done
    done
} >"$tmp"
mv "$tmp" "$manifest"
echo "batch.sh: ${#contents[@]} content x ${#styles[@]} style image(s); manifest $manifest" >&2

exec "$python" "$root/style.py" batch "$manifest" "$@"
