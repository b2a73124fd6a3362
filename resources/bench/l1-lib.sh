# shellcheck shell=dash
# /lib/bench-l1.sh in L1 (resources/bench/l1-lib.sh, put there by bench_in_l1): the rounds
# and the ending that every two-VMM benchmark scenario shares. The scenario sources
# /lib/bed.sh and this, starts one guest per VMM (run_bg tandem ..., run_bg qemu ...) whose
# agent answers at $(addr VMM).2, and defines `measure VMM MODE`, which prints one number.
#
#   bench_settings          runs, secs from L1's command line (tandem.bench_runs=<n> (6),
#                           tandem.bench_secs=<s> (5)); RUN_TIMEOUT to match
#   addr VMM                the guest's /24: 10.77.0 for tandem, 10.78.0 for qemu
#   bench_rounds MODE=KEY...  $runs rounds; in each every MODE is measured once per VMM, the
#                           VMM going first alternating from round to round; one line per
#                           round and VMM into /tmp/bench.lines: vmm=<v> run=<i> KEY=<value>...
#   bench_end               tells the guests' agents to quit and ends the runs; prints
#                           "BENCH <line> rc=<VMM's status>" for each line; returns 1 if a VMM
#                           failed, a value is 0 or a guest's script did not exit 0 (then its
#                           output follows, indented)

bench_settings() {
  runs=6 secs=5
  for _a in $(cat /proc/cmdline); do
    case $_a in
      tandem.bench_runs=*) runs=${_a#*=} ;;
      tandem.bench_secs=*) secs=${_a#*=} ;;
    esac
  done
  RUN_TIMEOUT=$((runs * 60 + 600))
}

addr() { [ "$1" = tandem ] && echo 10.77.0 || echo 10.78.0; }

bench_rounds() {
  : > /tmp/bench.lines
  _i=1
  while [ "$_i" -le "$runs" ]; do
    if [ $((_i % 2)) = 1 ]; then _order="tandem qemu"; else _order="qemu tandem"; fi
    for _mk in "$@"; do
      for _vmm in $_order; do
        eval "_v_${_vmm}_${_mk%%=*}=\$(measure $_vmm ${_mk%%=*})"
      done
    done
    for _vmm in tandem qemu; do
      _line="vmm=$_vmm run=$_i"
      for _mk in "$@"; do
        eval "_line=\"\$_line ${_mk#*=}=\$_v_${_vmm}_${_mk%%=*}\""
      done
      echo "$_line" >> /tmp/bench.lines
    done
    _i=$((_i + 1))
  done
}

bench_end() {
  _fail=0
  for _vmm in tandem qemu; do
    l2_quit "$(addr $_vmm).2" >/dev/null || { _fail=1; run_signal $_vmm TERM; }
  done
  for _vmm in tandem qemu; do
    run_end $_vmm > /tmp/end.$_vmm
    _rc=$?
    touch /tmp/bench.lines
    grep "vmm=$_vmm " /tmp/bench.lines | while read -r _l; do echo "BENCH $_l rc=$_rc"; done
    if [ $_rc != 0 ] || grep "vmm=$_vmm " /tmp/bench.lines | grep -qE '=0( |$)' \
       || ! grep -q 'TANDEM-L2-SCRIPT-EXIT rc=0' /tmp/end.$_vmm; then
      _fail=1
      echo "--- $_vmm, its output:"; tr -d '\r' < /tmp/end.$_vmm | sed 's/^/  | /' | tail -n 30
    fi
  done
  return $_fail
}
