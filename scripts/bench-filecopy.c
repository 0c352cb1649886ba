/* Benchmark helper for scripts/bench-controllers.sh: the ceiling for a rebuild on
 * a file system. Writes SRC (BYTES long), then copies it with copy_file_range into
 * DST, created new and fallocated each time as `array replace` leaves a new disk,
 * checking nothing. Prints the best of three copies in GiB/s.
 *
 *   bench-filecopy SRC DST BYTES
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: bench-filecopy SRC DST BYTES\n");
        return 2;
    }
    size_t n = strtoull(argv[3], 0, 10), step = 64u << 20;
    int src = open(argv[1], O_RDWR | O_CREAT | O_TRUNC, 0600);
    char *buf = malloc(step);
    if (src < 0 || !buf || n % step) {
        fprintf(stderr, "bench-filecopy: cannot create %s (BYTES must be a multiple of 64 MiB)\n", argv[1]);
        return 2;
    }
    for (size_t i = 0; i < step; i++) buf[i] = (char)(i * 7 + i / 4096);
    for (size_t off = 0; off < n; off += step)
        if (pwrite(src, buf, step, off) != (ssize_t)step) { perror("bench-filecopy: pwrite"); return 1; }
    double best = 0;
    for (int run = 0; run < 3; run++) {
        unlink(argv[2]);
        int dst = open(argv[2], O_RDWR | O_CREAT | O_TRUNC, 0600);
        if (dst < 0 || fallocate(dst, 0, 0, n)) { perror("bench-filecopy: fallocate"); return 1; }
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        loff_t in = 0, out = 0;
        while ((size_t)in < n) {
            ssize_t got = copy_file_range(src, &in, dst, &out, n - in, 0);
            if (got <= 0) { perror("bench-filecopy: copy_file_range"); return 1; }
        }
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double s = (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9;
        double gib = n / s / (1u << 30);
        if (gib > best) best = gib;
        close(dst);
    }
    unlink(argv[1]);
    unlink(argv[2]);
    printf("%.2f\n", best);
    return 0;
}
