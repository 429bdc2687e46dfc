# Sourced by the bench scripts that run Python peers: one way to get their virtualenv.
#
#   bench_venv <venv dir> <modules to import, comma-separated> <pip packages...>
#
# Creates the virtualenv if it is missing and installs the packages (from PyPI, by name) if
# the modules do not import; then sets PYTHON to its interpreter. Nothing else is touched.
bench_venv() {
    local venv="$1" imports="$2"
    shift 2
    PYTHON="$venv/bin/python"
    if [ ! -x "$PYTHON" ]; then
        python3 -m venv "$venv"
    fi
    if ! "$PYTHON" -c "import $imports" 2>/dev/null; then
        "$PYTHON" -m pip install --quiet "$@"
    fi
}
