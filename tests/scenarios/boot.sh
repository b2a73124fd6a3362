# L1 scenario for tests/bed_boot.rs: boots the L2 guest with tandem in each shape the
# boot issue asks for. Each run is bracketed for the harness; the L2 console is inline.
K=/l2/vmlinuz
I=/l2/initrd.gz
# loglevel=4 keeps the console short (each byte is a nested exit) but shows warnings.
BASE="console=ttyS0 panic=-1 loglevel=4"
run() {
  name=$1; shift
  echo "RUN-BEGIN $name"
  # A hung run must end before L1's own timeout, so the other runs still report.
  timeout 300 tandem --kernel $K --initramfs $I "$@" </dev/null
  echo "RUN-END $name rc=$?"
}
run cpu1-256m --cpus 1 --memory 256M --cmdline "$BASE tandem.action=poweroff"
run cpu2-256m --cpus 2 --memory 256M --cmdline "$BASE tandem.action=poweroff"
run cpu2-5g --cpus 2 --memory 5G --cmdline "$BASE tandem.action=poweroff"
run reboot --cpus 1 --memory 256M --cmdline "$BASE tandem.action=reboot"
run reboot-i8042 --cpus 1 --memory 256M --cmdline "$BASE reboot=k tandem.action=reboot"
