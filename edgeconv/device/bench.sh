#!/bin/sh
# edgeconv's on-device benchmark with llama.cpp's own programs: copied verbatim into every GGUF bundle as bench.sh,
# beside bench.py. POSIX sh; needs sed, awk and sha256sum (or shasum), and llama-bench (llama-perplexity optional).
#
#   sh bench.sh                                  # in the bundle; llama-bench from PATH
#   sh bench.sh --llama-cpp ~/llama.cpp/build/bin --threads 6
#
# In order:
#   1. verify: every file manifest.json lists must be inside the bundle and match its sha256, bench.sh and the
#      model among them, else exit 2 before anything runs;
#   2. find llama-bench (--llama-cpp DIR, else PATH); without it, print how to build it for this bundle's target
#      and exit 3;
#   3. llama-bench -m MODEL -p 512 -n 128 -t THREADS -o json (-ngl 99 on CUDA and Metal targets) > llama-bench.json;
#   4. llama-perplexity -c 512 on each eval/CORPUS.txt, when it is found next to llama-bench or on PATH
#      -> perplexity.txt (its full output, one section per corpus);
#   5. llama-bench.edgeconv.json: the bundle, the target, the device (on a Jetson: `nvpmodel -q` and whether
#      jetson_clocks pinned the clocks), the perplexities and the commands.
# Bring the three files back; `edgeconv report llama-bench.json --out report/` reads them into its tables and plots.
# Exit status: 0 done, 1 a llama.cpp program failed, 2 refused (the bundle does not match manifest.json, bad option),
# 3 llama-bench not found.

set -u

usage() {
    cat <<'EOF'
usage: sh bench.sh [--llama-cpp DIR] [--threads N] [--gpu-layers N] [--out DIR] [--quick] [--no-perplexity]
                   [--no-verify]

  --llama-cpp DIR   where llama-bench is: DIR, DIR/bin or DIR/build/bin [default: PATH]
  --threads N       llama.cpp threads [default: the bundle's, at most the cores here]
  --gpu-layers N    layers offloaded to the GPU [default: 99 on CUDA and Metal targets, llama-bench's own elsewhere]
  --out DIR         where llama-bench.json, perplexity.txt and llama-bench.edgeconv.json go [default: the bundle]
  --quick           2 llama-bench repetitions instead of 5, 4 perplexity chunks of 512 tokens instead of 32
  --no-perplexity   llama-bench only
  --no-verify       skip the sha256 check of the bundle's files (the results then say "verified": false)
EOF
}

die() {  # die STATUS MESSAGE
    echo "bench.sh: $2" >&2
    exit "$1"
}

need_value() {
    [ "$2" -ge 2 ] || die 2 "error: $1 needs a value (sh bench.sh --help)"
}

absolute() {  # a path given on the command line, made absolute before bench.sh changes directory
    case "$1" in
        /*) printf '%s\n' "$1" ;;
        *) printf '%s\n' "$PWD/$1" ;;
    esac
}

llama_dir="" threads="" ngl="" out="" quick=0 perplexity=1 verify=1
while [ $# -gt 0 ]; do
    case "$1" in
        --llama-cpp) need_value "$1" $#; llama_dir=$(absolute "$2"); shift 2 ;;
        --llama-cpp=*) llama_dir=$(absolute "${1#*=}"); shift ;;
        --threads) need_value "$1" $#; threads=$2; shift 2 ;;
        --threads=*) threads=${1#*=}; shift ;;
        --gpu-layers) need_value "$1" $#; ngl=$2; shift 2 ;;
        --gpu-layers=*) ngl=${1#*=}; shift ;;
        --out) need_value "$1" $#; out=$(absolute "$2"); shift 2 ;;
        --out=*) out=$(absolute "${1#*=}"); shift ;;
        --quick) quick=1; shift ;;
        --no-perplexity) perplexity=0; shift ;;
        --no-verify) verify=0; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die 2 "error: unknown option $1 (sh bench.sh --help)" ;;
    esac
done
for n in "$threads" "$ngl"; do
    case "$n" in *[!0-9]*) die 2 "error: --threads and --gpu-layers take a whole number, not $n" ;; esac
done
[ "$threads" != 0 ] || die 2 "error: --threads must be at least 1"

bundle=$(cd "$(dirname "$0")" && pwd -P) || die 2 "error: cannot enter the directory of $0"
cd "$bundle" || die 2 "error: cannot enter $bundle"
[ -n "$out" ] || out=$bundle
mkdir -p "$out" || die 2 "error: cannot create $out; pass --out"
started=$(date -u +%Y-%m-%dT%H:%M:%SZ)
clock=$(date +%s)
[ -f manifest.json ] || die 2 "refusing to run: $bundle has no manifest.json; re-copy the bundle"

# manifest.json as edgeconv writes it (json.dumps, indent 2): one top-level key a line. Values stay JSON-escaped,
# as they are written back into llama-bench.edgeconv.json.
mstr() {
    sed -n "s/^  \"$1\": \"\\(.*\\)\",\\{0,1\\}\$/\\1/p" manifest.json | head -n 1
}
mnum() {
    sed -n "s/^  \"$1\": \\([0-9][0-9]*\\),\\{0,1\\}\$/\\1/p" manifest.json | head -n 1
}

name=$(mstr name) model=$(mstr model) fmt=$(mstr format) quant=$(mstr quant) target=$(mstr target)
accelerator=$(mstr accelerator) wanted=$(mnum threads)
[ -n "$model" ] || die 2 "refusing to run: manifest.json names no model; re-copy the bundle"
[ "${fmt:-gguf}" = gguf ] ||
    die 2 "error: this bundle's model is $fmt; llama.cpp's programs run GGUF files (use bench.py)"

tmp=$(mktemp -d 2>/dev/null || mktemp -d -t edgeconv) || die 2 "error: cannot create a temporary directory"
trap 'rm -rf "$tmp"' EXIT
trap 'exit 130' INT TERM

# 1. Verify
verified=false
if [ "$verify" = 1 ]; then
    if command -v sha256sum >/dev/null 2>&1; then
        sha="sha256sum"
    elif command -v shasum >/dev/null 2>&1; then
        sha="shasum -a 256"
    else
        die 2 "refusing to run: neither sha256sum nor shasum is installed to check the bundle (--no-verify skips it)"
    fi
    awk '
        /^  "files": \{/ { files = 1; next }
        files && /^  \}/ { files = 0 }
        files && /^    "/ { name = $0; sub(/^    "/, "", name); sub(/": \{ *$/, "", name); next }
        files && /^      "sha256": "/ {
            h = $0; sub(/^      "sha256": "/, "", h); sub(/",? *$/, "", h); print h "  " name }
    ' manifest.json > "$tmp/sums"
    [ -s "$tmp/sums" ] || die 2 "refusing to run: manifest.json lists no files; re-copy the bundle"
    problems=0
    : > "$tmp/problems"
    while IFS= read -r line; do
        h=${line%%  *} rel=${line#*  }
        case "/$rel/" in
            */../*|*/./*|//*)
                echo "$rel in manifest.json is not a path inside the bundle" >> "$tmp/problems"; continue ;;
        esac
        case "$h" in
            *[!0-9a-f]*|'') echo "$rel has no sha256 in manifest.json" >> "$tmp/problems"; continue ;;
        esac
        [ ${#h} -eq 64 ] || { echo "$rel has no sha256 in manifest.json" >> "$tmp/problems"; continue; }
        if [ -L "$rel" ]; then
            echo "$rel is a symbolic link" >> "$tmp/problems"
            continue
        fi
        dir=$(cd "$(dirname "$rel")" 2>/dev/null && pwd -P) || dir=""
        case "$dir/" in
            "$bundle"/*) ;;
            *) [ -z "$dir" ] && echo "$rel is missing" >> "$tmp/problems" ||
                   echo "$rel leads outside the bundle (a symbolic link)" >> "$tmp/problems"; continue ;;
        esac
        [ -f "$rel" ] || { echo "$rel is missing" >> "$tmp/problems"; continue; }
        printf '%s  %s\n' "$h" "$rel" >> "$tmp/check"
    done < "$tmp/sums"
    if [ -s "$tmp/check" ]; then
        $sha -c "$tmp/check" 2>/dev/null | sed -n 's/: FAILED.*$//p' |
            while IFS= read -r rel; do
                echo "$rel does not match manifest.json (sha256 differs: the file was modified or damaged)"
            done >> "$tmp/problems"
    fi
    cut -c 67- "$tmp/sums" | grep -qx 'bench.sh' || echo "bench.sh is not listed in manifest.json" >> "$tmp/problems"
    cut -c 67- "$tmp/sums" | awk -v m="$model" '$0 == m || index($0, m "/") == 1 { found = 1 } END { exit !found }' ||
        echo "model $model in manifest.json is not among its hashed files" >> "$tmp/problems"
    problems=$(wc -l < "$tmp/problems" | tr -d ' ')
    if [ "$problems" -gt 0 ]; then
        sed 's/^/  /' "$tmp/problems" >&2
        die 2 "refusing to run: $(head -n 1 "$tmp/problems")$([ "$problems" -gt 1 ] &&
            echo " (and $((problems - 1)) more)"); re-copy the bundle"
    fi
    echo "verified $(wc -l < "$tmp/sums" | tr -d ' ') files against manifest.json" >&2
    verified=true
fi

# 2. Find llama-bench
find_program() {  # find_program NAME: DIR given with --llama-cpp (DIR, DIR/bin, DIR/build/bin), else PATH
    if [ -n "$llama_dir" ]; then
        for d in "$llama_dir" "$llama_dir/bin" "$llama_dir/build/bin"; do
            [ -x "$d/$1" ] && [ -f "$d/$1" ] && { printf '%s\n' "$d/$1"; return 0; }
        done
        return 1
    fi
    command -v "$1" 2>/dev/null
}

build_help() {
    where=${llama_dir:+in $llama_dir (nor in its bin/ or build/bin/)}
    echo "bench.sh: llama-bench was not found ${where:-on PATH}. Build llama.cpp's tools for this target" \
         "(${target:-unknown}), then run: sh bench.sh --llama-cpp llama.cpp/build/bin"
    echo
    echo "    git clone https://github.com/ggml-org/llama.cpp && cd llama.cpp"
    case "$target:$accelerator" in
        jetson*)
            echo "    # JetPack 6 (Orin: compute capability 8.7); nvcc is in /usr/local/cuda/bin, not on PATH"
            echo "    export CUDACXX=/usr/local/cuda/bin/nvcc"
            echo "    cmake -B build -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=87"
            echo "    cmake --build build --config Release -j \$(nproc) --target llama-bench llama-perplexity"
            echo "    # Jetson figures need the power mode fixed: sudo nvpmodel -m 0 && sudo jetson_clocks" ;;
        *:cuda)
            echo "    cmake -B build -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=native"
            echo "    cmake --build build --config Release -j \$(nproc) --target llama-bench llama-perplexity" ;;
        android*)
            echo "    # on the phone, in Termux:"
            echo "    pkg install git cmake clang"
            echo "    cmake -B build && cmake --build build --config Release -j 4 --target llama-bench llama-perplexity"
            echo "    # or on a computer with the Android NDK and adb (llama.cpp's docs/android.md):"
            echo "    cmake -DCMAKE_TOOLCHAIN_FILE=\$ANDROID_NDK/build/cmake/android.toolchain.cmake \\"
            echo "          -DANDROID_ABI=arm64-v8a -DANDROID_PLATFORM=android-28 -DGGML_NATIVE=OFF \\"
            echo "          -DGGML_OPENMP=OFF -DGGML_LLAMAFILE=OFF -DLLAMA_CURL=OFF -B build-android"
            echo "    cmake --build build-android --config Release -j 8 --target llama-bench llama-perplexity"
            echo "    edgeconv bench THIS_BUNDLE --adb --llama-bench build-android/bin   # pushes, runs, pulls" ;;
        iphone*)
            echo "    # iOS has no shell to run this script: measure the same GGUF on a Mac (Metal is on by default)"
            echo "    cmake -B build && cmake --build build --config Release -j --target llama-bench llama-perplexity"
            echo "    # on the phone itself: llama.cpp's examples/llama.swiftui app (Xcode) runs a pp/tg bench" ;;
        *:metal)
            echo "    # macOS: Metal is on by default"
            echo "    cmake -B build"
            echo "    cmake --build build --config Release -j --target llama-bench llama-perplexity" ;;
        *)
            echo "    cmake -B build"
            echo "    cmake --build build --config Release -j --target llama-bench llama-perplexity" ;;
    esac
}

llama_bench=$(find_program llama-bench) || llama_bench=""
if [ -z "$llama_bench" ]; then
    build_help
    exit 3
fi

# Threads: the bundle's, at most the cores usable here (more threads than cores only make llama.cpp wait).
cores=$( (nproc || getconf _NPROCESSORS_ONLN || sysctl -n hw.ncpu) 2>/dev/null | head -n 1)
case "$cores" in ''|*[!0-9]*) cores=1 ;; esac
capped_from=null
if [ -z "$threads" ]; then
    threads=${wanted:-$cores}
    if [ "$threads" -gt "$cores" ]; then
        echo "the bundle asks for $threads threads but only $cores cores are usable here: using $cores" >&2
        capped_from=$threads threads=$cores
    fi
fi
# GPU targets offload every layer, as bench.py's --gpu-layers -1 does.
if [ -z "$accelerator" ]; then
    case "$target" in jetson*) accelerator=cuda ;; laptop-apple|iphone) accelerator=metal ;; *) accelerator=cpu ;; esac
fi
if [ -z "$ngl" ] && [ "$accelerator" != cpu ]; then
    ngl=99
fi

json_str() {  # stdin -> one JSON string: control characters dropped, quotes and backslashes escaped, lines joined
    printf '"'
    tr -d '\000-\010\013-\037' | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g' -e 's/	/\\t/g' |
        awk 'NR > 1 { printf "\\n" } { printf "%s", $0 }'
    printf '"'
}
val() {  # a shell value as JSON: a string, or null when empty
    if [ -n "$1" ]; then printf '%s' "$1" | json_str; else printf 'null'; fi
}
notes=""
note() {
    echo "note: $1" >&2
    notes="$notes${notes:+, }$(val "$1")"
}

# 3. llama-bench
set -- -m "$model" -p 512 -n 128 -t "$threads" -o json
[ -n "$ngl" ] && set -- "$@" -ngl "$ngl"
[ "$quick" = 1 ] && set -- "$@" -r 2
bench_cmd="$llama_bench $*"
echo "+ $bench_cmd" >&2
if ! "$llama_bench" "$@" > "$tmp/llama-bench.json" 2> "$out/llama-bench.log"; then
    tail -n 5 "$out/llama-bench.log" >&2
    die 1 "error: llama-bench failed; its log: $out/llama-bench.log"
fi
cp "$tmp/llama-bench.json" "$out/llama-bench.json"

# 4. llama-perplexity on each corpus of eval/
ppl_json="" ppl_cmd="" ppl_out=null chunks=32
[ "$quick" = 1 ] && chunks=4
if [ "$perplexity" = 1 ]; then
    llama_ppl=""
    [ -x "$(dirname "$llama_bench")/llama-perplexity" ] && llama_ppl="$(dirname "$llama_bench")/llama-perplexity"
    [ -n "$llama_ppl" ] || [ -n "$llama_dir" ] || llama_ppl=$(command -v llama-perplexity 2>/dev/null) || llama_ppl=""
    if [ -z "$llama_ppl" ]; then
        note "llama-perplexity not found next to $llama_bench: perplexity not measured"
    else
        : > "$out/perplexity.txt"
        ppl_out='"perplexity.txt"'
        for text in eval/*.txt; do
            [ -f "$text" ] || { note "no eval/*.txt in the bundle: perplexity not measured"; break; }
            corpus=$(basename "$text" .txt)
            set -- -m "$model" -f "$text" -c 512 --chunks "$chunks" -t "$threads"
            [ -n "$ngl" ] && set -- "$@" -ngl "$ngl"
            echo "+ $llama_ppl $*" >&2
            echo "# edgeconv corpus $corpus: $llama_ppl $*" >> "$out/perplexity.txt"
            ppl_cmd=$(echo "$llama_ppl $*" | sed "s| -f $text | -f eval/CORPUS.txt |")
            # llama.cpp logs from a thread it never joins at exit (llama.cpp issue 22142): seen here, a run exiting 0
            # whose last lines (the last chunk, "Final estimate") never reached the file. Such a run is repeated once.
            value="" attempt=0
            while [ -z "$value" ] && [ "$attempt" -lt 2 ]; do
                attempt=$((attempt + 1)) rc=0
                "$llama_ppl" "$@" > "$tmp/ppl" 2>&1 || rc=$?
                cat "$tmp/ppl" >> "$out/perplexity.txt"
                if [ "$rc" != 0 ]; then
                    echo "# llama-perplexity exited with status $rc" >> "$out/perplexity.txt"
                    note "llama-perplexity failed on $text with status $rc (see perplexity.txt)"
                    break
                fi
                value=$(sed -n 's/.*Final estimate: PPL = \([0-9][0-9.eE+-]*\).*/\1/p' "$tmp/ppl" | tail -n 1)
                [ -n "$value" ] || echo "# no final estimate in this output (attempt $attempt)" >> "$out/perplexity.txt"
            done
            [ -n "$value" ] || value=null
            ppl_json="$ppl_json${ppl_json:+, }$(val "$corpus"): $value"
        done
    fi
fi

# 5. The device, and llama-bench.edgeconv.json
read_file() { [ -r "$1" ] && tr -d '\000' < "$1" 2>/dev/null; }
tool_output() {  # a tool's output, as this user or through sudo -n (which never asks for a password)
    "$@" 2>/dev/null || { command -v sudo >/dev/null 2>&1 && sudo -n "$@" 2>/dev/null; }
}
processor=$(awk '/^(model name|Hardware|Processor|cpu model)[ \t]*:/ { sub(/^[^:]*:[ \t]*/, ""); print; exit }' \
            /proc/cpuinfo 2>/dev/null)
[ -n "$processor" ] || processor=$(sysctl -n machdep.cpu.brand_string 2>/dev/null)
memory=$(awk '/^MemTotal:/ { printf "%.1f", $2 / 1024 }' /proc/meminfo 2>/dev/null)
[ -n "$memory" ] || memory=$(sysctl -n hw.memsize 2>/dev/null | awk '{ printf "%.1f", $1 / 1048576 }')
board=$(read_file /proc/device-tree/model)
jetson=""
case "$board" in
    *[Jj]etson*) jetson=$board ;;
    *) [ -n "$board" ] && [ -f /etc/nv_tegra_release ] && jetson=$board ;;
esac
android=""
command -v getprop >/dev/null 2>&1 && android=$(getprop ro.product.model 2>/dev/null)
gpu=""
command -v nvidia-smi >/dev/null 2>&1 &&
    gpu=$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -n 1)

nvpmodel=null
if command -v nvpmodel >/dev/null 2>&1; then
    text=$(tool_output nvpmodel -q)
    mode=$(printf '%s\n' "$text" | sed -n 's/^NV Power Mode: *//p' | head -n 1)
    mode_id=$(printf '%s\n' "$text" | awk 'seen && /^[0-9]+$/ { print; exit } /^NV Power Mode:/ { seen = 1 }')
    nvpmodel="{\"mode\": $(val "$mode"), \"id\": ${mode_id:-null}, \"source\": \"nvpmodel -q\"}"
    echo "power mode: nvpmodel ${mode:-unknown}${mode_id:+ ($mode_id)}" >&2
fi
jetson_clocks=null
if command -v jetson_clocks >/dev/null 2>&1; then
    source="jetson_clocks --show"
    on=$(tool_output jetson_clocks --show | awk '
        /^cpu[0-9]+:/ && /Online=0/ { next }
        (/^cpu[0-9]+:/ || /^GPU /) && /MinFreq=/ && /MaxFreq=/ {
            lo = $0; sub(/.*MinFreq=/, "", lo); sub(/ .*/, "", lo)
            hi = $0; sub(/.*MaxFreq=/, "", hi); sub(/ .*/, "", hi)
            n++; if (lo != hi) off++ }
        END { if (!n) print "null"; else if (off) print "false"; else print "true" }')
    if [ "$on" = null ]; then  # --show needs root: read what it sets, min = max frequency, from sysfs
        sysfs=${EDGECONV_SYSFS:-/sys}
        source="min = max frequency in $sysfs"
        on=$( {
                 for d in "$sysfs"/devices/system/cpu/cpu[0-9]*/cpufreq; do
                     [ -r "$d/scaling_min_freq" ] && echo "$(cat "$d/scaling_min_freq") $(cat "$d/scaling_max_freq")"
                 done
                 for d in "$sysfs"/class/devfreq/*gpu*; do
                     [ -r "$d/min_freq" ] && echo "$(cat "$d/min_freq") $(cat "$d/max_freq")"
                 done
             } | awk 'NF == 2 { n++; if ($1 != $2) off++ }
                      END { if (!n) print "null"; else if (off) print "false"; else print "true" }')
    fi
    jetson_clocks="{\"on\": $on, \"source\": $(val "$source")}"
    echo "jetson_clocks: $(echo "$on" | sed 's/true/on/; s/false/off/; s/null/unknown/')" >&2
fi

model_bytes=$(wc -c < "$model" 2>/dev/null | tr -d ' ')
cat > "$out/llama-bench.edgeconv.json" <<EOF
{
  "schema": "edgeconv-llama-bench/1",
  "llama_bench": "llama-bench.json",
  "label": $(val "$name"),
  "role": "student",
  "target": $(val "$target"),
  "bundle": $(val "$bundle"),
  "verified": $verified,
  "model": {"path": $(val "$model"), "format": "gguf", "bytes": ${model_bytes:-null}, "quant": $(val "$quant")},
  "threads": $threads,
  "threads_capped_from": $capped_from,
  "gpu_layers": ${ngl:-null},
  "commands": {"llama_bench": $(val "$bench_cmd"), "llama_perplexity": $(val "$ppl_cmd")},
  "perplexity": {$ppl_json},
  "perplexity_settings": {"context": 512, "chunks": $chunks, "output": $ppl_out},
  "device": {
    "platform": $(val "$(uname -srm 2>/dev/null)"),
    "system": $(val "$(uname -s 2>/dev/null)"),
    "machine": $(val "$(uname -m 2>/dev/null)"),
    "processor": $(val "$processor"),
    "logical_cores": $cores,
    "memory_total_mb": ${memory:-null},
    "board_model": $(val "$board"),
    "jetson_model": $(val "$jetson"),
    "android_model": $(val "$android"),
    "gpu": [$( [ -n "$gpu" ] && val "$gpu")],
    "hostname": $(val "$(uname -n 2>/dev/null)"),
    "nvpmodel": $nvpmodel,
    "jetson_clocks": $jetson_clocks
  },
  "notes": [$notes],
  "started": "$started",
  "seconds": $(( $(date +%s) - clock ))
}
EOF

# Summary: llama-bench's tests (pp512: prefill, tg128: decode), then the perplexities.
awk '
    /"n_prompt":/ { p = $2 + 0 }
    /"n_gen":/ { g = $2 + 0 }
    /"avg_ts":/ {
        test = g == 0 ? "pp" p : (p == 0 ? "tg" g : "pp" p "+tg" g)
        printf "  %-8s %12.1f tokens/s\n", test, $2 + 0 }
' "$out/llama-bench.json"
[ -n "$ppl_json" ] && echo "  perplexity (llama-perplexity, -c 512): $ppl_json"
echo "wrote $out/llama-bench.json, $out/llama-bench.edgeconv.json${ppl_json:+, $out/perplexity.txt}"
echo "compare: edgeconv report llama-bench.json results.json --out report/"
exit 0
