// dmapin BDF MIB [huge] — the kernel's own DMA pinning speed, the baseline of
// resources/bench/vfio.sh: with nothing but the VFIO ioctls, opens the IOMMU group of PCI
// device BDF (bound to vfio-pci) in a new type-1 container, maps MIB MiB of fresh anonymous
// memory (2 MiB huge pages with "huge") at IOVA 0 in one VFIO_IOMMU_MAP_DMA, as a VMM maps
// untouched guest RAM, and prints
//   DMAPIN mib=<n> huge=<0|1> ms=<time of the map call> gib_s=<x>
// Exit status 1 with the reason on stderr when a step fails.
#include <errno.h>
#include <fcntl.h>
#include <linux/vfio.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

static int fail(const char *what) {
  fprintf(stderr, "dmapin: %s: %s\n", what, strerror(errno));
  return 1;
}

int main(int argc, char **argv) {
  if (argc < 3) {
    fprintf(stderr, "usage: dmapin BDF MIB [huge]\n");
    return 2;
  }
  int huge = argc > 3 && strcmp(argv[3], "huge") == 0;
  size_t len = (size_t)strtoul(argv[2], NULL, 10) << 20;
  char path[512], link[256];
  snprintf(path, sizeof path, "/sys/bus/pci/devices/%s/iommu_group", argv[1]);
  ssize_t n = readlink(path, link, sizeof link - 1);
  if (n < 0) return fail(path);
  link[n] = 0;
  const char *group = strrchr(link, '/');
  snprintf(path, sizeof path, "/dev/vfio/%s", group ? group + 1 : link);

  int container = open("/dev/vfio/vfio", O_RDWR);
  if (container < 0) return fail("/dev/vfio/vfio");
  int g = open(path, O_RDWR);
  if (g < 0) return fail(path);
  if (ioctl(g, VFIO_GROUP_SET_CONTAINER, &container)) return fail("VFIO_GROUP_SET_CONTAINER");
  if (ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)) return fail("VFIO_SET_IOMMU");

  int flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE | (huge ? MAP_HUGETLB : 0);
  void *mem = mmap(NULL, len, PROT_READ | PROT_WRITE, flags, -1, 0);
  if (mem == MAP_FAILED) return fail("mmap");
  struct vfio_iommu_type1_dma_map map = {
      .argsz = sizeof map,
      .flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
      .vaddr = (unsigned long)mem,
      .iova = 0,
      .size = len,
  };
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  if (ioctl(container, VFIO_IOMMU_MAP_DMA, &map)) return fail("VFIO_IOMMU_MAP_DMA");
  clock_gettime(CLOCK_MONOTONIC, &b);
  double ms = (b.tv_sec - a.tv_sec) * 1e3 + (b.tv_nsec - a.tv_nsec) / 1e6;
  printf("DMAPIN mib=%zu huge=%d ms=%.1f gib_s=%.2f\n", len >> 20, huge, ms, (len / 1073741824.0) / (ms / 1e3));
  return 0;
}
