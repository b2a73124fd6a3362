// hammer — a guest program that leans on its VMM's vCPU exits as hard as one vCPU can
// (resources/bench/hammer.sh), built static by resources/guest/build-l2.sh into the L2
// tools initramfs as /bin/hammer.
//
//   hammer SECS CONFIG
//       For SECS seconds, in a tight loop, reads the first dword of the PCI configuration
//       space file CONFIG (/sys/bus/pci/devices/BDF/config): the guest kernel makes each a
//       configuration access (ECAM MMIO or the 0xcf8/0xcfc ports), an exit that the VMM's
//       vCPU thread answers in userspace, in any VMM.
//       -> HAMMER secs=S reads=N reads_per_s=N
//
// (Port I/O from userspace would be the direct way, but iopl(3) then inb faults in the
// guest under one of the two VMMs compared, so both get the kernel's own accesses.) The
// queue side of the hammering is blkbench (resources/guest/blkbench.c) running next to it:
// O_DIRECT reads, each a queue notify the VMM's device thread serves.
// Exit status: 0 ok, 1 CONFIG cannot be read, 2 usage.
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: hammer SECS CONFIG\n");
        return 2;
    }
    double secs = atof(argv[1]);
    if (secs <= 0) {
        fprintf(stderr, "hammer: SECS must be > 0\n");
        return 2;
    }
    int fd = open(argv[2], O_RDONLY);
    uint32_t id;
    if (fd < 0 || pread(fd, &id, sizeof id, 0) != sizeof id) {
        perror("hammer: reading the configuration space");
        return 1;
    }
    double start = now(), end = start + secs, t = start;
    unsigned long reads = 0;
    while (t < end) {
        for (int i = 0; i < 64; i++) {
            if (pread(fd, &id, sizeof id, 0) != sizeof id) {
                perror("hammer: reading the configuration space");
                return 1;
            }
        }
        reads += 64;
        t = now();
    }
    printf("HAMMER secs=%.3f reads=%lu reads_per_s=%.0f id=%08x\n", t - start, reads, reads / (t - start), id);
    return 0;
}
