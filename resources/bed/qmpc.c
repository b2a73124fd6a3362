/*
 * qmpc — a small QMP client for L1 scenarios, which drive QEMU 7.2 started with
 * `-qmp unix:SOCK,server=on,wait=off` (busybox nc has no Unix sockets). Runs inside L1,
 * built static by resources/bed/build-l1.sh as /bin/qmpc.
 *
 *   qmpc [-t SECS] SOCK STEP...
 *
 * Connects to SOCK (retrying while it does not exist yet), reads QEMU's greeting, sends
 * qmp_capabilities, then runs each STEP in order:
 *   {...}              a QMP command (one JSON object): sent, then qmpc waits for its
 *                      answer, {"return": ...} (go on) or {"error": ...} (stop, exit 2)
 *   event=NAME[,TEXT]  waits for an event NAME (e.g. DEVICE_DELETED) whose line also
 *                      contains TEXT (e.g. the device's id); events that arrived during
 *                      earlier steps of this call count
 * Each connection attempt and each step waits at most SECS (default 30).
 * Every line QEMU sends, and every command sent, is printed on stdout as
 *   QMP <ms> <line>    (<< for a command sent), ms on CLOCK_MONOTONIC since qmpc started
 * Exit status: 0 all steps done; 1 bad usage or no connection; 2 an error answer;
 * 3 a timeout, or QEMU closed the connection.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define MAX_EVENTS 256

static int fd;
static double t0, step_secs = 30;
static char inbuf[1 << 17];
static size_t inlen;
static char line[1 << 17];
static char *events[MAX_EVENTS]; /* event lines not yet consumed by an event= step */
static int nevents;
static int stored; /* the last line read_line returned was kept in events[nevents - 1] */

static double mono_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* Reads one line from QEMU into `line` until deadline (ms); 1 got one, 0 timeout or EOF.
 * Event lines are also kept for later event= steps. */
static int read_line(double deadline) {
  for (;;) {
    char *nl = memchr(inbuf, '\n', inlen);
    if (nl) {
      size_t n = (size_t)(nl - inbuf);
      memcpy(line, inbuf, n);
      line[n] = 0;
      memmove(inbuf, nl + 1, inlen - n - 1);
      inlen -= n + 1;
      while (n && (line[n - 1] == '\r' || line[n - 1] == ' ')) line[--n] = 0;
      printf("QMP %.1f %s\n", mono_ms() - t0, line);
      fflush(stdout);
      stored = strstr(line, "\"event\"") && nevents < MAX_EVENTS && (events[nevents] = strdup(line));
      if (stored) nevents++;
      return 1;
    }
    double left = deadline - mono_ms();
    if (left <= 0 || inlen >= sizeof inbuf - 1) return 0;
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int r = poll(&p, 1, (int)left + 1);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) continue;
    ssize_t k = read(fd, inbuf + inlen, sizeof inbuf - 1 - inlen);
    if (k <= 0) return 0;
    inlen += (size_t)k;
  }
}

static int command(const char *json) {
  printf("QMP %.1f << %s\n", mono_ms() - t0, json);
  fflush(stdout);
  size_t n = strlen(json);
  if (write(fd, json, n) != (ssize_t)n || write(fd, "\n", 1) != 1) return 3;
  double deadline = mono_ms() + step_secs * 1000;
  while (read_line(deadline)) {
    if (!strncmp(line, "{\"return\"", 9)) return 0;
    if (!strncmp(line, "{\"error\"", 8)) return 2;
  }
  return 3;
}

static int matches(const char *l, const char *name, const char *text) {
  char quoted[300];
  snprintf(quoted, sizeof quoted, "\"%s\"", name);
  return strstr(l, "\"event\"") && strstr(l, quoted) && (!*text || strstr(l, text));
}

static int wait_event(const char *spec) {
  char name[256], text[256] = "";
  const char *comma = strchr(spec, ',');
  size_t n = comma ? (size_t)(comma - spec) : strlen(spec);
  if (n == 0 || n >= sizeof name) return 1;
  memcpy(name, spec, n);
  name[n] = 0;
  if (comma) snprintf(text, sizeof text, "%s", comma + 1);
  for (int i = 0; i < nevents; i++) {
    if (events[i] && matches(events[i], name, text)) {
      free(events[i]);
      events[i] = NULL;
      return 0;
    }
  }
  double deadline = mono_ms() + step_secs * 1000;
  while (read_line(deadline)) {
    if (matches(line, name, text)) {
      if (stored) { /* consumed */
        free(events[--nevents]);
        events[nevents] = NULL;
      }
      return 0;
    }
  }
  printf("QMP %.1f no event %s%s%s within %.0f s\n", mono_ms() - t0, name, *text ? " with " : "", text,
         step_secs);
  return 3;
}

static void usage(void) {
  fprintf(stderr, "usage: qmpc [-t SECS] SOCK {JSON}|event=NAME[,TEXT]...\n");
  exit(1);
}

int main(int argc, char **argv) {
  int c;
  while ((c = getopt(argc, argv, "t:")) != -1) {
    if (c == 't') step_secs = atof(optarg);
    else usage();
  }
  if (optind >= argc || step_secs <= 0) usage();
  const char *path = argv[optind++];
  struct sockaddr_un sa = {.sun_family = AF_UNIX};
  if (strlen(path) >= sizeof sa.sun_path) usage();
  strcpy(sa.sun_path, path);
  t0 = mono_ms();
  for (;;) {
    fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd >= 0 && connect(fd, (struct sockaddr *)&sa, sizeof sa) == 0) break;
    int e = errno;
    if (fd >= 0) close(fd);
    if (mono_ms() - t0 > step_secs * 1000) {
      fprintf(stderr, "qmpc: connect %s: %s\n", path, strerror(e));
      return 1;
    }
    usleep(100 * 1000);
  }
  if (!read_line(mono_ms() + step_secs * 1000) || !strstr(line, "\"QMP\"")) {
    fprintf(stderr, "qmpc: no QMP greeting on %s\n", path);
    return 3;
  }
  int rc = command("{\"execute\": \"qmp_capabilities\"}");
  for (int i = optind; rc == 0 && i < argc; i++) {
    if (!strncmp(argv[i], "event=", 6)) rc = wait_event(argv[i] + 6);
    else if (argv[i][0] == '{') rc = command(argv[i]);
    else usage();
  }
  close(fd);
  return rc;
}
