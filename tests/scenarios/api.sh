# L1 scenario for tests/bed_api.rs: a guest with a virtio NIC and disk, steered through the
# control socket with `tandem ctl` while it prints a tick every 200 ms.
. /lib/bed.sh
SOCK=/tmp/vm0.sock
tap_up tapi 10.79.0.1/24
printf 'i=0\nwhile :; do i=$((i + 1)); echo "L2-TICK $i"; sleep 0.2; done\n' | mkscript_disk /tmp/tick.img -
run_bg api $TANDEM --kernel $L2_KERNEL --initramfs $L2_INITRD --memory 256M --api-socket $SOCK \
  --net tap=tapi,id=nic0 --disk path=/tmp/tick.img,readonly=on,id=script --cmdline "$L2_SCRIPT_CMDLINE"
ticks() { run_console api | grep -c "L2-TICK"; }
ctl() { $TANDEM ctl --api-socket $SOCK "$@"; }

run_wait_for api "L2-TICK 5" 300 || echo "L1-API-NO-TICKS"
ctl info | tr -d '\n ' | sed 's/^/L1-API-INFO /'; echo
ctl counters | tr -d '\n ' | sed 's/^/L1-API-COUNTERS /'; echo
ctl pause > /dev/null && echo "L1-API-PAUSED"
sleep 1; a=$(ticks); sleep 3; b=$(ticks)
echo "L1-API-DURING-PAUSE before=$a after=$b"
ctl pause 2>&1 | sed 's/^/L1-API-PAUSE-AGAIN /'
ctl resume > /dev/null && echo "L1-API-RESUMED"
sleep 3; echo "L1-API-AFTER-RESUME ticks=$(ticks)"
ctl device-remove nosuch 2>&1 | sed 's/^/L1-API-REMOVE-UNKNOWN /'
ctl raw PUT device-remove '{"id": ' 2>&1 | tr -d '\n' | sed 's/^/L1-API-MALFORMED /'; echo
ctl info | tr -d '\n ' | sed 's/^/L1-API-INFO-AGAIN /'; echo
ctl shutdown > /dev/null && echo "L1-API-SHUTDOWN-SENT"
run_end api
echo "L1-API-SOCKET-LEFT $([ -e $SOCK ] && echo yes || echo no)"
tap_down tapi
