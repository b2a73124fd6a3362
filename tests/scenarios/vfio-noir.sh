# L1 scenario for tests/bed_vfio.rs, L1 booted with intremap=off (run-l1.sh --iommu --igb
# --append intremap=off): the IOMMU translates DMA but does not remap interrupts.
. /lib/bed.sh
PF=$(igb_pf_up 10.98.0.2/24) || exit 1
echo "L1-IR-CHIPS n=$(grep -c ' IR-' /proc/interrupts) allow=$(cat /sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts)"
printf 'IF=$(l2_if_by_driver igbvf) && echo "L2-VF-UP if=$IF mac=$(cat /sys/class/net/$IF/address)"\n' \
  | mkscript_disk /tmp/script.img -

run_tandem refused --kernel $L2_KERNEL --initramfs $L2_INITRD --memory 512M \
  --vf "pf=$PF,index=0,mac=02:00:00:00:bb:01,create=on" \
  --disk path=/tmp/script.img,readonly=on,id=script --cmdline "$L2_SCRIPT_CMDLINE"
echo "L1-AFTER-REFUSED $(vf_state "$PF" 0)"

echo 1 > /sys/module/vfio_iommu_type1/parameters/allow_unsafe_interrupts
run_vm unsafe --kernel $L2_KERNEL --initramfs $L2_INITRD --memory 512M \
  --vf "pf=$PF,index=0,mac=02:00:00:00:bb:02,create=on" \
  --disk path=/tmp/script.img,readonly=on,id=script --cmdline "$L2_SCRIPT_CMDLINE $L2_NMI_DUMP"
echo "L1-AFTER-UNSAFE $(vf_state "$PF" 0)"
