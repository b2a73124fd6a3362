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
  timeout 300 tandem --kernel ${KERNEL:-$K} --initramfs $I "$@" </dev/null
  echo "RUN-END $name rc=$?"
}
run cpu1-256m --cpus 1 --memory 256M --cmdline "$BASE tandem.action=poweroff"
run cpu2-256m --cpus 2 --memory 256M --cmdline "$BASE tandem.action=poweroff"
run cpu2-5g --cpus 2 --memory 5G --cmdline "$BASE tandem.action=poweroff"
run reboot --cpus 1 --memory 256M --cmdline "$BASE tandem.action=reboot"
run reboot-i8042 --cpus 1 --memory 256M --cmdline "$BASE reboot=k tandem.action=reboot"

# The same kernel as an uncompressed ELF vmlinux (carried in by the test).
KERNEL=/l2/vmlinux
run elf --cpus 1 --memory 256M --cmdline "$BASE"
KERNEL=

# Host input reaches the guest: its shell reads commands from tandem's stdin (COM1 RX, IRQ 4).
# Typed once the shell is up, as a user would: bytes sent while the guest's 8250 driver still
# probes and resets its FIFO are lost on real hardware too.
rm -f /tmp/serial-in /tmp/serial-in.out; mkfifo /tmp/serial-in
timeout 300 tandem --kernel $K --initramfs $I --memory 256M --cmdline "$BASE tandem.action=shell" \
  < /tmp/serial-in > /tmp/serial-in.out 2>&1 &
tpid=$!
exec 3> /tmp/serial-in
i=0; until grep -q "built-in shell" /tmp/serial-in.out || [ $i -ge 1500 ]; do sleep 0.2; i=$((i + 1)); done
sleep 1
printf 'echo SERIAL-IN-$((6*7))\nexit\n' >&3
wait $tpid
rc=$?
exec 3>&-
echo "RUN-BEGIN serial-input"
cat /tmp/serial-in.out
echo "RUN-END serial-input rc=$rc"

# --serial file=: the guest's console goes to the file, not to tandem's stdout.
echo "RUN-BEGIN serial-file"
timeout 300 tandem --kernel $K --initramfs $I --memory 256M --cmdline "$BASE" --serial file=/tmp/l2.log </dev/null
rc=$?
echo "SERIAL-FILE-MARKERS $(grep -c TANDEM-L2-INIT /tmp/l2.log)"
echo "RUN-END serial-file rc=$rc"

# SIGTERM mid-boot stops the VM in order: status 128+15.
echo "RUN-BEGIN sigterm"
tandem --kernel $K --initramfs $I --memory 256M --cmdline "$BASE" </dev/null &
pid=$!
sleep 2
kill -TERM $pid
wait $pid
echo "RUN-END sigterm rc=$?"
