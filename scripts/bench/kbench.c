/*
 * kbench — the timing helper of scripts/bench.sh.
 *
 * Loops that a shell would dominate (fork+exec per iteration) run here, in C,
 * so the numbers measure the filesystem. Every measurement is repeated REPS
 * times; the helper prints each repetition and a final line
 *
 *     RESULT <median> <min> <max> [<median2>]
 *
 * that the script parses. Build: gcc -O2 -pthread -o kbench kbench.c
 *
 * Subcommands
 *   read PATH ITERS THREADS REPS [eof]
 *       open(O_RDONLY) + read(4096) + close, ITERS times in each of THREADS
 *       threads, all on PATH. With "eof", read until read() returns 0 (what
 *       `cat` does: one more read). Every read is checked against the file's
 *       size. RESULT: per-op latency µs (wall / ITERS: what one thread sees),
 *       then (as <median2>) aggregate ops/s over all threads.
 *   stat PATH ITERS REPS
 *       stat(PATH) ITERS times. RESULT: µs per call.
 *   rotate ITERS FSYNC FILE...
 *       One repetition per FILE: ITERS times, write 32 random bytes to
 *       FILE.new (O_CREAT|O_TRUNC, 0600), fsync it when FSYNC=1, close,
 *       rename(FILE.new, FILE). RESULT: rotations per second.
 *   waitmount PROBE REFDIR TIMEOUT_MS
 *       Poll (every 200 µs) until stat(PROBE) succeeds on a different device
 *       than REFDIR (the directory the mountpoint lives in). Prints the
 *       wall-clock time it happened, in µs since the epoch (compare with
 *       bash's $EPOCHREALTIME taken just before the daemon was spawned).
 *   phases PATH ITERS
 *       open+read+close ITERS times, timing each call; prints the mean µs
 *       spent in open, read and close ("PHASES <open> <read> <close>").
 *   mkdirs DIR PREFIX FIRST COUNT
 *       mkdir DIR/PREFIX%06d for FIRST..FIRST+COUNT-1 (mode 0700).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void die(const char *what, const char *path) {
    fprintf(stderr, "kbench: %s %s: %s\n", what, path ? path : "", strerror(errno));
    exit(2);
}

static int cmp_d(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    double *c = malloc(sizeof(double) * (size_t)n);
    memcpy(c, v, sizeof(double) * (size_t)n);
    qsort(c, (size_t)n, sizeof(double), cmp_d);
    double m = (n % 2) ? c[n / 2] : (c[n / 2 - 1] + c[n / 2]) / 2.0;
    free(c);
    return m;
}

static double vmin(double *v, int n) {
    double m = v[0];
    for (int i = 1; i < n; i++)
        if (v[i] < m) m = v[i];
    return m;
}

static double vmax(double *v, int n) {
    double m = v[0];
    for (int i = 1; i < n; i++)
        if (v[i] > m) m = v[i];
    return m;
}

/* ---------- read ---------- */

struct rd {
    const char *path;
    long iters;
    int eof;
    off_t size;
    pthread_barrier_t *start;
    long bad;
};

static long read_loop(const char *path, long iters, int eof, off_t size) {
    char buf[4096];
    long bad = 0;
    for (long i = 0; i < iters; i++) {
        int fd = open(path, O_RDONLY);
        if (fd < 0) die("open", path);
        ssize_t n = read(fd, buf, sizeof buf);
        if (n != size) bad++;
        if (eof) {
            ssize_t m;
            while ((m = read(fd, buf, sizeof buf)) > 0) bad++;
            if (m < 0) die("read", path);
        }
        if (close(fd) != 0) die("close", path);
    }
    return bad;
}

static void *read_thread(void *p) {
    struct rd *r = p;
    pthread_barrier_wait(r->start);
    r->bad = read_loop(r->path, r->iters, r->eof, r->size);
    return NULL;
}

static int cmd_read(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: kbench read PATH ITERS THREADS REPS [eof]\n");
        return 1;
    }
    const char *path = argv[2];
    long iters = atol(argv[3]);
    int threads = atoi(argv[4]);
    int reps = atoi(argv[5]);
    int eof = argc > 6 && strcmp(argv[6], "eof") == 0;
    struct stat st;
    if (stat(path, &st) != 0) die("stat", path);
    if (read_loop(path, iters / 20 + 10, eof, st.st_size) != 0) {
        fprintf(stderr, "kbench: %s: reads did not return %lld bytes\n", path, (long long)st.st_size);
        return 2;
    }
    double lat[reps], ops[reps];
    for (int r = 0; r < reps; r++) {
        pthread_barrier_t b;
        pthread_barrier_init(&b, NULL, (unsigned)threads + 1);
        pthread_t tid[threads];
        struct rd a[threads];
        for (int t = 0; t < threads; t++) {
            a[t] = (struct rd){path, iters, eof, st.st_size, &b, 0};
            pthread_create(&tid[t], NULL, read_thread, &a[t]);
        }
        double t0 = now_s();
        pthread_barrier_wait(&b);
        t0 = now_s();
        long bad = 0;
        for (int t = 0; t < threads; t++) {
            pthread_join(tid[t], NULL);
            bad += a[t].bad;
        }
        double el = now_s() - t0;
        pthread_barrier_destroy(&b);
        if (bad) {
            fprintf(stderr, "kbench: %s: %ld reads returned a wrong length\n", path, bad);
            return 2;
        }
        lat[r] = el * 1e6 / (double)iters;
        ops[r] = (double)iters * threads / el;
        printf("rep %d: %.2f us/op per thread, %.0f ops/s aggregate\n", r, lat[r], ops[r]);
    }
    printf("RESULT %.3f %.3f %.3f %.0f\n", median(lat, reps), vmin(lat, reps), vmax(lat, reps), median(ops, reps));
    return 0;
}

/* ---------- stat ---------- */

static int cmd_stat(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: kbench stat PATH ITERS REPS\n");
        return 1;
    }
    const char *path = argv[2];
    long iters = atol(argv[3]);
    int reps = atoi(argv[4]);
    struct stat st;
    for (long i = 0; i < iters / 20 + 10; i++)
        if (stat(path, &st) != 0) die("stat", path);
    double v[reps];
    for (int r = 0; r < reps; r++) {
        double t0 = now_s();
        for (long i = 0; i < iters; i++)
            if (stat(path, &st) != 0) die("stat", path);
        v[r] = (now_s() - t0) * 1e6 / (double)iters;
        printf("rep %d: %.3f us/stat\n", r, v[r]);
    }
    printf("RESULT %.3f %.3f %.3f\n", median(v, reps), vmin(v, reps), vmax(v, reps));
    return 0;
}

/* ---------- rotate ---------- */

static int cmd_rotate(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: kbench rotate ITERS FSYNC FILE...\n");
        return 1;
    }
    long iters = atol(argv[2]);
    int do_fsync = atoi(argv[3]);
    int reps = argc - 4;
    double v[reps];
    for (int r = 0; r < reps; r++) {
        const char *file = argv[4 + r];
        char tmp[4096];
        snprintf(tmp, sizeof tmp, "%s.new", file);
        double t0 = now_s();
        for (long i = 0; i < iters; i++) {
            unsigned char key[32];
            if (getrandom(key, sizeof key, 0) != (ssize_t)sizeof key) die("getrandom", NULL);
            int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
            if (fd < 0) die("open", tmp);
            if (write(fd, key, sizeof key) != (ssize_t)sizeof key) die("write", tmp);
            if (do_fsync && fsync(fd) != 0) die("fsync", tmp);
            if (close(fd) != 0) die("close", tmp);
            if (rename(tmp, file) != 0) die("rename", file);
        }
        double el = now_s() - t0;
        v[r] = (double)iters / el;
        printf("rep %d (%s): %.0f rotations/s (%.1f us each)\n", r, file, v[r], el * 1e6 / (double)iters);
    }
    printf("RESULT %.1f %.1f %.1f\n", median(v, reps), vmin(v, reps), vmax(v, reps));
    return 0;
}

/* ---------- waitmount ---------- */

static int cmd_waitmount(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: kbench waitmount PROBE REFDIR TIMEOUT_MS\n");
        return 1;
    }
    struct stat ref, st;
    if (stat(argv[3], &ref) != 0) die("stat", argv[3]);
    double deadline = now_s() + atof(argv[4]) / 1000.0;
    struct timespec nap = {0, 200000};
    while (now_s() < deadline) {
        if (stat(argv[2], &st) == 0 && st.st_dev != ref.st_dev) {
            struct timespec rt;
            clock_gettime(CLOCK_REALTIME, &rt);
            printf("%lld\n", (long long)rt.tv_sec * 1000000LL + rt.tv_nsec / 1000);
            return 0;
        }
        nanosleep(&nap, NULL);
    }
    fprintf(stderr, "kbench: %s did not appear within %s ms\n", argv[2], argv[4]);
    return 3;
}

/* ---------- phases ---------- */

static int cmd_phases(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: kbench phases PATH ITERS\n");
        return 1;
    }
    const char *path = argv[2];
    long iters = atol(argv[3]);
    char buf[4096];
    double to = 0, tr = 0, tc = 0;
    read_loop(path, iters / 20 + 10, 0, 0);
    for (long i = 0; i < iters; i++) {
        double t0 = now_s();
        int fd = open(path, O_RDONLY);
        if (fd < 0) die("open", path);
        double t1 = now_s();
        if (read(fd, buf, sizeof buf) < 0) die("read", path);
        double t2 = now_s();
        if (close(fd) != 0) die("close", path);
        double t3 = now_s();
        to += t1 - t0;
        tr += t2 - t1;
        tc += t3 - t2;
    }
    printf("PHASES %.2f %.2f %.2f\n", to * 1e6 / (double)iters, tr * 1e6 / (double)iters, tc * 1e6 / (double)iters);
    return 0;
}

/* ---------- mkdirs ---------- */

static int cmd_mkdirs(int argc, char **argv) {
    if (argc < 6) {
        fprintf(stderr, "usage: kbench mkdirs DIR PREFIX FIRST COUNT\n");
        return 1;
    }
    long first = atol(argv[4]), count = atol(argv[5]);
    char p[4096];
    for (long i = first; i < first + count; i++) {
        snprintf(p, sizeof p, "%s/%s%06ld", argv[2], argv[3], i);
        if (mkdir(p, 0700) != 0 && errno != EEXIST) die("mkdir", p);
    }
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2) {
        fprintf(stderr, "usage: kbench read|stat|rotate|waitmount|phases|mkdirs ...\n");
        return 1;
    }
    if (!strcmp(argv[1], "read")) return cmd_read(argc, argv);
    if (!strcmp(argv[1], "stat")) return cmd_stat(argc, argv);
    if (!strcmp(argv[1], "rotate")) return cmd_rotate(argc, argv);
    if (!strcmp(argv[1], "waitmount")) return cmd_waitmount(argc, argv);
    if (!strcmp(argv[1], "mkdirs")) return cmd_mkdirs(argc, argv);
    if (!strcmp(argv[1], "phases")) return cmd_phases(argc, argv);
    fprintf(stderr, "kbench: unknown command %s\n", argv[1]);
    return 1;
}
