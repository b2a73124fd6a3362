// blkbench — a small block I/O tool for the L2 guest and for L1 (built static by
// resources/guest/build-l2.sh into resources/cache/blkbench).
//
//   blkbench randread [-t SECS] [-b BS] [-j JOBS] DEV
//       BS-sized reads (default 4 KiB) at random BS-aligned offsets, O_DIRECT, for SECS
//       seconds (default 5), JOBS threads (default 1) each with one read in flight.
//       -> BLKBENCH mode=randread dev=DEV bs=4096 jobs=1 secs=5.001 ios=N iops=N mbps=X
//   blkbench seqread [-t SECS] [-b BS] DEV
//       BS-sized reads (default 1 MiB) from offset 0 upwards, O_DIRECT, wrapping at the end,
//       for SECS seconds (default 5).
//       -> BLKBENCH mode=seqread dev=DEV bs=1048576 jobs=1 secs=5.002 ios=N iops=N mbps=X
//   blkbench pattern write|verify DEV OFFSET LEN SEED
//       writes, or reads back and checks, the deterministic pattern of SEED over the byte range
//       [OFFSET, OFFSET+LEN) of DEV (a block device or a file; a file is created if missing).
//       -> BLKBENCH mode=pattern-write result=ok off=N len=N seed=S sha256=HEX
//       -> BLKBENCH mode=pattern-verify result=ok|bad off=N len=N seed=S bad_at=-1|N sha256=HEX
//       sha256 is that of the LEN bytes written / read, so it can be compared with
//       `dd ... | sha256sum` or `blkbench gen SEED LEN OFFSET | sha256sum` elsewhere.
//       bad_at is the absolute byte offset of the first byte that differs.
//   blkbench gen SEED LEN [OFFSET]
//       writes the same pattern for [OFFSET, OFFSET+LEN) to stdout (test data for pipes,
//       e.g. a TCP transfer, or to fill an image file).
//   blkbench sum [SEED]
//       reads stdin to its end; with SEED also checks it against the pattern from offset 0.
//       -> BLKBENCH mode=sum bytes=N sha256=HEX [seed=S pattern=ok|bad bad_at=-1|N]
//       A short or long stream is not "bad" by itself: compare bytes= too.
//
// Sizes and offsets take a K, M or G suffix (powers of 1024). mbps is 10^6 bytes per second.
// The pattern: byte p (absolute offset in the device) is byte p%8 (little-endian) of the
// 64-bit word splitmix64(SEED * 0x9E3779B97F4A7C15 + p/8): the same bytes whatever range is
// written or read, so one range can be written and any part of it verified.
//
// I/O uses O_DIRECT whenever the file system allows it and OFFSET/LEN/BS are multiples of
// 512 (the guest's page cache then neither serves nor holds the data); otherwise (e.g. a file
// on tmpfs, as in L1) buffered I/O, with fsync after a write and the cached pages of the range
// dropped before a verify. Errors print `result=error op=<open|read|write|fsync> err=<ERRNO>`.
// Exit status: 0 ok, 1 pattern mismatch, 2 usage error, 3 I/O error.
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define ALIGN 4096

static void usage(void) {
  fprintf(stderr,
          "usage: blkbench randread [-t SECS] [-b BS] [-j JOBS] DEV\n"
          "       blkbench seqread [-t SECS] [-b BS] DEV\n"
          "       blkbench pattern write|verify DEV OFFSET LEN SEED\n"
          "       blkbench gen SEED LEN [OFFSET]\n"
          "       blkbench sum [SEED]\n");
  exit(2);
}

static const char *errname(int e) {
  const char *n = strerrorname_np(e);
  return n ? n : "UNKNOWN";
}

static uint64_t parse_size(const char *s) {
  char *end;
  errno = 0;
  unsigned long long v = strtoull(s, &end, 0);
  if (errno || end == s) {
    fprintf(stderr, "blkbench: '%s' is not a size\n", s);
    exit(2);
  }
  switch (*end) {
    case 0: break;
    case 'k': case 'K': v <<= 10; end++; break;
    case 'm': case 'M': v <<= 20; end++; break;
    case 'g': case 'G': v <<= 30; end++; break;
    default: end = (char *)"?";
  }
  if (*end) {
    fprintf(stderr, "blkbench: '%s' is not a size (suffixes: K M G)\n", s);
    exit(2);
  }
  return v;
}

static double now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void *xalloc(size_t n) {
  void *p;
  if (posix_memalign(&p, ALIGN, n ? n : ALIGN)) {
    fprintf(stderr, "blkbench: out of memory (%zu bytes)\n", n);
    exit(3);
  }
  return p;
}

static uint64_t dev_size(int fd) {
  struct stat st;
  if (fstat(fd, &st) == 0 && S_ISBLK(st.st_mode)) {
    uint64_t sz = 0;
    if (ioctl(fd, BLKGETSIZE64, &sz) == 0) return sz;
    return 0;
  }
  return fstat(fd, &st) == 0 ? (uint64_t)st.st_size : 0;
}

// ---- the pattern ----
static uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Fills buf with the pattern bytes of absolute offsets [pos, pos+n).
static void pattern_fill(uint8_t *buf, uint64_t pos, size_t n, uint64_t seed) {
  uint64_t base = seed * 0x9E3779B97F4A7C15ull;
  size_t i = 0;
  while (i < n && ((pos + i) & 7)) {  // leading partial word
    uint64_t w = splitmix64(base + (pos + i) / 8);
    buf[i] = (uint8_t)(w >> (8 * ((pos + i) & 7)));
    i++;
  }
  for (; i + 8 <= n; i += 8) {
    uint64_t w = splitmix64(base + (pos + i) / 8);
    for (int b = 0; b < 8; b++) buf[i + b] = (uint8_t)(w >> (8 * b));
  }
  for (; i < n; i++) {  // trailing partial word
    uint64_t w = splitmix64(base + (pos + i) / 8);
    buf[i] = (uint8_t)(w >> (8 * ((pos + i) & 7)));
  }
}

// ---- SHA-256 (FIPS 180-4) ----
typedef struct {
  uint32_t h[8];
  uint8_t blk[64];
  size_t fill;
  uint64_t total;
} sha256_t;

static const uint32_t K256[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};

static uint32_t ror(uint32_t x, int n) { return (x >> n) | (x << (32 - n)); }

static void sha256_block(sha256_t *s, const uint8_t *p) {
  uint32_t w[64];
  for (int i = 0; i < 16; i++)
    w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
  for (int i = 16; i < 64; i++) {
    uint32_t s0 = ror(w[i - 15], 7) ^ ror(w[i - 15], 18) ^ (w[i - 15] >> 3);
    uint32_t s1 = ror(w[i - 2], 17) ^ ror(w[i - 2], 19) ^ (w[i - 2] >> 10);
    w[i] = w[i - 16] + s0 + w[i - 7] + s1;
  }
  uint32_t a = s->h[0], b = s->h[1], c = s->h[2], d = s->h[3];
  uint32_t e = s->h[4], f = s->h[5], g = s->h[6], h = s->h[7];
  for (int i = 0; i < 64; i++) {
    uint32_t t1 = h + (ror(e, 6) ^ ror(e, 11) ^ ror(e, 25)) + ((e & f) ^ (~e & g)) + K256[i] + w[i];
    uint32_t t2 = (ror(a, 2) ^ ror(a, 13) ^ ror(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
    h = g; g = f; f = e; e = d + t1;
    d = c; c = b; b = a; a = t1 + t2;
  }
  s->h[0] += a; s->h[1] += b; s->h[2] += c; s->h[3] += d;
  s->h[4] += e; s->h[5] += f; s->h[6] += g; s->h[7] += h;
}

static void sha256_init(sha256_t *s) {
  static const uint32_t iv[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                 0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};
  memcpy(s->h, iv, sizeof iv);
  s->fill = 0;
  s->total = 0;
}

static void sha256_update(sha256_t *s, const uint8_t *p, size_t n) {
  s->total += n;
  if (s->fill) {
    while (n && s->fill < 64) { s->blk[s->fill++] = *p++; n--; }
    if (s->fill < 64) return;
    sha256_block(s, s->blk);
    s->fill = 0;
  }
  for (; n >= 64; p += 64, n -= 64) sha256_block(s, p);
  memcpy(s->blk, p, n);
  s->fill = n;
}

static void sha256_hex(sha256_t *s, char out[65]) {
  uint64_t bits = s->total * 8;
  uint8_t pad = 0x80, zero = 0, len[8];
  sha256_update(s, &pad, 1);
  while (s->fill != 56) sha256_update(s, &zero, 1);
  for (int i = 0; i < 8; i++) len[i] = (uint8_t)(bits >> (56 - 8 * i));
  sha256_update(s, len, 8);
  for (int i = 0; i < 8; i++) sprintf(out + 8 * i, "%08x", s->h[i]);
}

// ---- open with O_DIRECT when possible ----
// Returns the fd; *direct tells whether O_DIRECT is in effect.
static int open_dev(const char *path, int flags, int want_direct, int *direct) {
  int fd = -1;
  *direct = 0;
  if (want_direct) {
    fd = open(path, flags | O_DIRECT | O_CLOEXEC, 0644);
    if (fd >= 0) { *direct = 1; return fd; }
    if (errno != EINVAL) return -1;  // EINVAL: this file system has no O_DIRECT (tmpfs)
  }
  return open(path, flags | O_CLOEXEC, 0644);
}

// ---- randread / seqread ----
typedef struct {
  int fd;
  uint64_t size, bs;
  double end;
  uint64_t ios;
  int err, seq;
  unsigned seed;
} job_t;

static void *job_run(void *arg) {
  job_t *j = arg;
  uint8_t *buf = xalloc(j->bs);
  uint64_t blocks = j->size / j->bs, x = 0x2545F4914F6CDD1Dull ^ ((uint64_t)j->seed * 0x9E3779B97F4A7C15ull);
  uint64_t next = 0;
  while (now() < j->end) {
    uint64_t off;
    if (j->seq) {
      off = next * j->bs;
      next = (next + 1) % blocks;
    } else {
      x ^= x << 13; x ^= x >> 7; x ^= x << 17;  // xorshift64
      off = (x % blocks) * j->bs;
    }
    ssize_t r = pread(j->fd, buf, j->bs, (off_t)off);
    if (r != (ssize_t)j->bs) { j->err = r < 0 ? errno : EIO; break; }
    j->ios++;
  }
  free(buf);
  return NULL;
}

static int cmd_read(int seq, int argc, char **argv) {
  double secs = 5;
  uint64_t bs = seq ? (1 << 20) : 4096;
  int jobs = 1, c;
  const char *mode = seq ? "seqread" : "randread";
  while ((c = getopt(argc, argv, "t:b:j:")) != -1) {
    switch (c) {
      case 't': secs = atof(optarg); break;
      case 'b': bs = parse_size(optarg); break;
      case 'j': jobs = atoi(optarg); break;
      default: usage();
    }
  }
  if (optind + 1 != argc || secs <= 0 || bs == 0 || bs % 512 || jobs < 1 || jobs > 64 || (seq && jobs != 1)) usage();
  const char *dev = argv[optind];
  int direct;
  int fd = open_dev(dev, O_RDONLY, 1, &direct);
  if (fd < 0) {
    printf("BLKBENCH mode=%s dev=%s result=error op=open err=%s\n", mode, dev, errname(errno));
    return 3;
  }
  uint64_t size = dev_size(fd);
  if (size < bs) {
    printf("BLKBENCH mode=%s dev=%s result=error op=size err=TOO_SMALL size=%" PRIu64 "\n", mode, dev, size);
    return 3;
  }
  job_t js[64];
  pthread_t th[64];
  double t0 = now();
  for (int i = 0; i < jobs; i++) {
    js[i] = (job_t){.fd = fd, .size = size, .bs = bs, .end = t0 + secs, .seq = seq, .seed = (unsigned)i + 1};
    if (pthread_create(&th[i], NULL, job_run, &js[i])) { perror("pthread_create"); return 3; }
  }
  uint64_t ios = 0;
  int err = 0;
  for (int i = 0; i < jobs; i++) {
    pthread_join(th[i], NULL);
    ios += js[i].ios;
    if (js[i].err) err = js[i].err;
  }
  double el = now() - t0;
  if (err) {
    printf("BLKBENCH mode=%s dev=%s result=error op=read err=%s\n", mode, dev, errname(err));
    return 3;
  }
  printf("BLKBENCH mode=%s dev=%s bs=%" PRIu64 " jobs=%d direct=%d secs=%.3f ios=%" PRIu64
         " iops=%.0f mbps=%.1f\n",
         mode, dev, bs, jobs, direct, el, ios, ios / el, ios * (double)bs / el / 1e6);
  close(fd);
  return 0;
}

// ---- pattern write / verify ----
static int cmd_pattern(int argc, char **argv) {
  if (argc != 6) usage();
  int wr;
  if (!strcmp(argv[1], "write")) wr = 1;
  else if (!strcmp(argv[1], "verify")) wr = 0;
  else usage();
  const char *dev = argv[2];
  uint64_t off = parse_size(argv[3]), len = parse_size(argv[4]), seed = parse_size(argv[5]);
  const char *mode = wr ? "pattern-write" : "pattern-verify";
  int aligned = off % 512 == 0 && len % 512 == 0, direct;
  int fd = open_dev(dev, wr ? (O_WRONLY | O_CREAT) : O_RDONLY, aligned, &direct);
#define FAIL(op, e)                                                                             \
  do {                                                                                          \
    printf("BLKBENCH mode=%s result=error op=%s err=%s off=%" PRIu64 " len=%" PRIu64 "\n", mode, \
           op, errname(e), off, len);                                                           \
    return 3;                                                                                   \
  } while (0)
  if (fd < 0) FAIL("open", errno);
  if (!wr && !direct) {  // nothing stale from the page cache
    fdatasync(fd);
    posix_fadvise(fd, (off_t)off, (off_t)len, POSIX_FADV_DONTNEED);
  }
  const size_t chunk = 1 << 20;
  uint8_t *want = xalloc(chunk), *got = xalloc(chunk);
  sha256_t sh;
  sha256_init(&sh);
  int64_t bad_at = -1;
  for (uint64_t done = 0; done < len;) {
    size_t n = len - done < chunk ? (size_t)(len - done) : chunk;
    pattern_fill(want, off + done, n, seed);
    if (wr) {
      for (size_t w = 0; w < n;) {
        ssize_t r = pwrite(fd, want + w, n - w, (off_t)(off + done + w));
        if (r < 0) FAIL("write", errno);
        if (r == 0) FAIL("write", ENOSPC);
        w += (size_t)r;
      }
      sha256_update(&sh, want, n);
    } else {
      for (size_t g = 0; g < n;) {
        ssize_t r = pread(fd, got + g, n - g, (off_t)(off + done + g));
        if (r < 0) FAIL("read", errno);
        if (r == 0) FAIL("read", ENODATA);  // past the end of the device or file
        g += (size_t)r;
      }
      sha256_update(&sh, got, n);
      if (bad_at < 0 && memcmp(want, got, n)) {
        size_t i = 0;
        while (want[i] == got[i]) i++;
        bad_at = (int64_t)(off + done + i);
      }
    }
    done += n;
  }
  if (wr && fsync(fd)) FAIL("fsync", errno);
  close(fd);
  char hex[65];
  sha256_hex(&sh, hex);
  if (wr)
    printf("BLKBENCH mode=%s result=ok off=%" PRIu64 " len=%" PRIu64 " seed=%" PRIu64 " direct=%d sha256=%s\n",
           mode, off, len, seed, direct, hex);
  else
    printf("BLKBENCH mode=%s result=%s off=%" PRIu64 " len=%" PRIu64 " seed=%" PRIu64 " direct=%d bad_at=%" PRId64
           " sha256=%s\n",
           mode, bad_at < 0 ? "ok" : "bad", off, len, seed, direct, bad_at, hex);
  return bad_at < 0 ? 0 : 1;
}

static int cmd_gen(int argc, char **argv) {
  if (argc != 3 && argc != 4) usage();
  uint64_t seed = parse_size(argv[1]), len = parse_size(argv[2]), off = argc == 4 ? parse_size(argv[3]) : 0;
  const size_t chunk = 1 << 20;
  uint8_t *buf = xalloc(chunk);
  for (uint64_t done = 0; done < len;) {
    size_t n = len - done < chunk ? (size_t)(len - done) : chunk;
    pattern_fill(buf, off + done, n, seed);
    for (size_t w = 0; w < n;) {
      ssize_t r = write(1, buf + w, n - w);
      if (r <= 0) {
        fprintf(stderr, "blkbench gen: write: %s\n", strerror(errno));
        return 3;
      }
      w += (size_t)r;
    }
    done += n;
  }
  return 0;
}

static int cmd_sum(int argc, char **argv) {
  if (argc != 1 && argc != 2) usage();
  int check = argc == 2;
  uint64_t seed = check ? parse_size(argv[1]) : 0, total = 0;
  const size_t chunk = 1 << 20;
  uint8_t *buf = xalloc(chunk), *want = xalloc(chunk);
  sha256_t sh;
  sha256_init(&sh);
  int64_t bad_at = -1;
  for (;;) {
    ssize_t r = read(0, buf, chunk);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      printf("BLKBENCH mode=sum result=error op=read err=%s bytes=%" PRIu64 "\n", errname(errno), total);
      return 3;
    }
    if (r == 0) break;
    sha256_update(&sh, buf, (size_t)r);
    if (check && bad_at < 0) {
      pattern_fill(want, total, (size_t)r, seed);
      if (memcmp(want, buf, (size_t)r)) {
        size_t i = 0;
        while (want[i] == buf[i]) i++;
        bad_at = (int64_t)(total + i);
      }
    }
    total += (uint64_t)r;
  }
  char hex[65];
  sha256_hex(&sh, hex);
  printf("BLKBENCH mode=sum bytes=%" PRIu64 " sha256=%s", total, hex);
  if (check) printf(" seed=%" PRIu64 " pattern=%s bad_at=%" PRId64, seed, bad_at < 0 ? "ok" : "bad", bad_at);
  printf("\n");
  return bad_at < 0 ? 0 : 1;
}

int main(int argc, char **argv) {
  setvbuf(stdout, NULL, _IOLBF, 0);
  if (argc < 2) usage();
  if (!strcmp(argv[1], "randread")) return cmd_read(0, argc - 1, argv + 1);
  if (!strcmp(argv[1], "seqread")) return cmd_read(1, argc - 1, argv + 1);
  if (!strcmp(argv[1], "pattern")) return cmd_pattern(argc - 1, argv + 1);
  if (!strcmp(argv[1], "gen")) return cmd_gen(argc - 1, argv + 1);
  if (!strcmp(argv[1], "sum")) return cmd_sum(argc - 1, argv + 1);
  usage();
  return 2;
}
