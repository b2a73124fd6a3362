# shellcheck shell=dash
# L1 scenario of resources/bench/boot.sh: boots the same L2 (kernel, initramfs, command line)
# alternately with Tandem and with QEMU 7.2 (-M microvm,rtc=on, the fastest QEMU setup
# measured), 512 MiB and 1 vCPU each, timed by bootmeter from the VMM's start to the
# TANDEM-L2-INIT line. Each round boots both kernel formats of the same kernel: the bzImage
# (/l2/vmlinuz, decompressed by the guest) and its uncompressed vmlinux (/l2/vmlinux, which
# QEMU enters through PVH and Tandem through the 64-bit boot protocol), and swaps which VMM
# goes first every round, because an L1 boot sequence has order effects of its own.
# One "BENCH vmm=<tandem|qemu> kernel=<bzimage|vmlinux> run=<i> lines=<n> ..." line per boot
# with bootmeter's fields; the host side computes the medians.
# Settings from L1's command line: tandem.bench_runs=<n> (default 5).
runs=5
for a in $(cat /proc/cmdline); do
  case $a in tandem.bench_runs=*) runs=${a#*=} ;; esac
done
AP="console=ttyS0 panic=-1 quiet"    # the same for both: each console byte is a nested exit
fail=0
i=1
while [ $i -le "$runs" ]; do
  if [ $((i % 2)) = 1 ]; then order="tandem qemu"; else order="qemu tandem"; fi
  for kernel in bzimage vmlinux; do
    case $kernel in bzimage) k=/l2/vmlinuz ;; *) k=/l2/vmlinux ;; esac
    for vmm in $order; do
      if [ $vmm = tandem ]; then
        set -- /bin/tandem --kernel $k --initramfs /l2/initrd.gz --cmdline "$AP" \
          --cpus 1 --memory 512M
      else
        set -- qemu-system-x86_64 -M microvm,rtc=on -accel kvm -cpu host -nodefaults -no-reboot \
          -display none -serial stdio -m 512 -smp 1 \
          -kernel $k -initrd /l2/initrd.gz -append "$AP"
      fi
      bootmeter -m TANDEM-L2-INIT -t 300 -a 60 "$@" </dev/null > /tmp/run.log 2>&1
      r=$(tail -n 1 /tmp/run.log)
      echo "BENCH vmm=$vmm kernel=$kernel run=$i lines=$(wc -l < /tmp/run.log) ${r#BOOTMETER }"
      case $r in *" status=0 killed=0 "*) ;; *) fail=1 ;; esac
      case $r in *marker_ms=-1*) fail=1 ;; esac
      if [ $i = 1 ] || [ $fail = 1 ]; then
        echo "--- $vmm $kernel run $i, its output:"; sed 's/^/  | /' /tmp/run.log | tail -n 25
      fi
    done
  done
  i=$((i + 1))
done
exit $fail
