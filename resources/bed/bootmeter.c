/*
 * bootmeter — time a VMM from its start to the guest's first line containing a marker, and
 * measure the VMM's memory. Runs inside L1 (built static: L1 has no C library of its own).
 *
 *   bootmeter [-m MARKER] [-t TIMEOUT_S] [-a AFTER_S] [-i INTERVAL_MS] [-q] CMD [ARG...]
 *
 * CMD's stdout and stderr go through a pipe and are copied to our stdout (not with -q).
 * Times are CLOCK_MONOTONIC milliseconds from just before fork(): host-side clocks, because
 * a nested guest's own clocks are not trustworthy. The child is killed (by its pid) if the
 * marker does not come within TIMEOUT_S (default 300), or if it has not exited AFTER_S
 * (default 30) after the marker; it also dies with us (PR_SET_PDEATHSIG).
 *
 * Memory, in KiB:
 *   hwm_kib        the child's peak resident set: the larger of VmHWM from /proc/PID/status
 *                  (sampled every INTERVAL_MS, default 100) and ru_maxrss from wait4(),
 *                  which is the kernel's high-water mark at exit, so nothing is missed
 *                  between samples.
 *   guest_rss_kib  the resident part of the largest anonymous (private, shared or memfd) mapping (from
 *                  /proc/PID/smaps, sampled; the largest value seen). For a VMM that is the
 *                  guest's RAM, so this is the guest memory the guest actually touched;
 *                  hwm_kib - guest_rss_kib is what the VMM itself costs.
 *   guest_map_kib  the size of that mapping (to check it is the guest RAM).
 *   at_marker_hwm_kib, at_marker_guest_rss_kib
 *                  the same two read together while the child is stopped (SIGSTOP, then
 *                  SIGCONT) on the marker: the peak up to then and the guest memory then.
 *                  The guest goes on touching memory after the last sample (its init runs
 *                  until it powers off), which ru_maxrss counts and guest_rss_kib may miss:
 *                  a difference of the whole-run pair can hold a 2 MiB huge page of guest
 *                  RAM. The pair at the marker cannot.
 *
 * Last line printed:
 *   BOOTMETER marker_ms=<ms|-1> exit_ms=<ms> status=<exit code|128+signal> killed=<0|1>
 *             hwm_kib=<n> guest_rss_kib=<n> guest_map_kib=<n> samples=<n>
 *             at_marker_hwm_kib=<n|-1> at_marker_guest_rss_kib=<n|-1>
 * Exit status: 0 if the marker was seen and CMD exited 0, 1 if no marker, 2 otherwise.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now_ms(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

/* VmHWM of pid in KiB, or -1 (e.g. once the process has exited). */
static long read_hwm(pid_t pid)
{
	char path[64], line[256];
	long v = -1;
	snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
	FILE *f = fopen(path, "r");
	if (!f)
		return -1;
	while (fgets(line, sizeof line, f))
		if (sscanf(line, "VmHWM: %ld", &v) == 1)
			break;
	fclose(f);
	return v;
}

/*
 * Walk /proc/pid/smaps; return the Rss (KiB) of the largest anonymous mapping and store
 * its size in *size_kib. A mapping header starts with a lowercase hex address; the field
 * lines ("Rss:", "VmFlags:" ...) start with an uppercase letter.
 */
static long read_guest_rss(pid_t pid, long *size_kib)
{
	char path[64], line[512];
	snprintf(path, sizeof path, "/proc/%d/smaps", (int)pid);
	FILE *f = fopen(path, "r");
	if (!f)
		return -1;
	long best_size = -1, best_rss = -1, cur_size = 0;
	int cur_anon = 0;
	while (fgets(line, sizeof line, f)) {
		if ((line[0] >= '0' && line[0] <= '9') || (line[0] >= 'a' && line[0] <= 'f')) {
			unsigned long lo, hi, off, inode;
			char perms[8], dev[16];
			int n = 0;
			cur_anon = 0;
			if (sscanf(line, "%lx-%lx %7s %lx %15s %lu %n", &lo, &hi, perms, &off, dev,
				   &inode, &n) < 6)
				continue;
			char *name = line + n;
			name[strcspn(name, "\n")] = 0;
			/*
			 * Anonymous memory: private (no name, or one given with
			 * PR_SET_VMA_ANON_NAME) or shared (shmem shows as /dev/zero, a memfd
			 * as /memfd:NAME) — a VMM may back guest RAM with either.
			 */
			cur_anon = (inode == 0 && (name[0] == 0 || strncmp(name, "[anon", 5) == 0)) ||
				   strncmp(name, "/dev/zero", 9) == 0 || strncmp(name, "/memfd:", 7) == 0;
			cur_size = (long)((hi - lo) / 1024);
		} else if (cur_anon && strncmp(line, "Rss:", 4) == 0) {
			long rss;
			if (sscanf(line + 4, "%ld", &rss) == 1 && cur_size > best_size) {
				best_size = cur_size;
				best_rss = rss;
			}
		}
	}
	fclose(f);
	*size_kib = best_size;
	return best_rss;
}

static void usage(void)
{
	fprintf(stderr, "usage: bootmeter [-m MARKER] [-t TIMEOUT_S] [-a AFTER_S] [-i INTERVAL_MS] [-q] "
			"CMD [ARG...]\n");
	exit(64);
}

int main(int argc, char **argv)
{
	const char *mark = "TANDEM-L2-INIT";
	double tmo = 300e3, after = 30e3, interval = 100;
	int quiet = 0, c;
	while ((c = getopt(argc, argv, "+m:t:a:i:q")) != -1) {
		switch (c) {
		case 'm': mark = optarg; break;
		case 't': tmo = atof(optarg) * 1e3; break;
		case 'a': after = atof(optarg) * 1e3; break;
		case 'i': interval = atof(optarg); break;
		case 'q': quiet = 1; break;
		default: usage();
		}
	}
	if (optind >= argc || interval <= 0)
		usage();

	int p[2];
	if (pipe(p)) {
		perror("bootmeter: pipe");
		return 2;
	}
	double t0 = now_ms();
	pid_t pid = fork();
	if (pid < 0) {
		perror("bootmeter: fork");
		return 2;
	}
	if (pid == 0) {
		prctl(PR_SET_PDEATHSIG, SIGKILL);
		dup2(p[1], 1);
		dup2(p[1], 2);
		close(p[0]);
		close(p[1]);
		execvp(argv[optind], argv + optind);
		fprintf(stderr, "bootmeter: cannot run %s: %s\n", argv[optind], strerror(errno));
		_exit(127);
	}
	close(p[1]);

	char lb[8192];
	size_t ll = 0;
	double tm = -1, deadline = t0 + tmo, next_sample = t0;
	long hwm = -1, grss = -1, gmap = -1, mhwm = -1, mgrss = -1;
	int killed = 0, samples = 0, exited = 0, st = 0;
	struct rusage ru;
	memset(&ru, 0, sizeof ru);
	for (;;) {
		double t = now_ms();
		if (t >= deadline) {
			kill(pid, SIGKILL);
			killed = 1;
			break;
		}
		if (t >= next_sample) {
			long h = read_hwm(pid), sz = -1, r = read_guest_rss(pid, &sz);
			if (h > hwm)
				hwm = h;
			if (r > grss) {
				grss = r;
				gmap = sz;
			}
			samples++;
			next_sample = t + interval;
		}
		double wait = (next_sample < deadline ? next_sample : deadline) - now_ms();
		struct pollfd pf = { p[0], POLLIN, 0 };
		int r = poll(&pf, 1, wait > 0 ? (int)wait + 1 : 0);
		if (r < 0 && errno != EINTR)
			break;
		if (r <= 0)
			continue;
		char b[4096];
		ssize_t k = read(p[0], b, sizeof b);
		if (k <= 0)
			break; /* EOF: the child (and anything it started) closed its output */
		if (!quiet) {
			fwrite(b, 1, k, stdout);
			fflush(stdout);
		}
		for (ssize_t i = 0; i < k; i++) {
			if (b[i] == '\n' || ll == sizeof lb - 1) {
				lb[ll] = 0;
				if (tm < 0 && strstr(lb, mark)) {
					tm = now_ms() - t0;
					deadline = now_ms() + after;
					next_sample = 0; /* sample right away: the guest is up */
					if (!exited && kill(pid, SIGSTOP) == 0) {
						int w;
						while ((w = wait4(pid, &st, WUNTRACED, &ru)) < 0 && errno == EINTR)
							;
						if (w == pid && WIFSTOPPED(st)) {
							long sz = -1;
							mhwm = read_hwm(pid);
							mgrss = read_guest_rss(pid, &sz);
							kill(pid, SIGCONT);
						} else if (w == pid) {
							exited = 1; /* it ended first: st and ru are its end */
						}
					}
				}
				ll = 0;
			} else {
				lb[ll++] = b[i];
			}
		}
	}
	while (!exited && wait4(pid, &st, 0, &ru) < 0 && errno == EINTR)
		;
	double te = now_ms() - t0;
	if (ru.ru_maxrss > hwm)
		hwm = ru.ru_maxrss;
	int status = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
	printf("\nBOOTMETER marker_ms=%.1f exit_ms=%.1f status=%d killed=%d hwm_kib=%ld guest_rss_kib=%ld "
	       "guest_map_kib=%ld samples=%d at_marker_hwm_kib=%ld at_marker_guest_rss_kib=%ld\n",
	       tm, te, status, killed, hwm, grss, gmap, samples, mhwm, mgrss);
	return tm < 0 ? 1 : (status == 0 && !killed ? 0 : 2);
}
