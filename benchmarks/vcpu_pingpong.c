// Cross-vCPU cache-line round trip, in ns: a thread pinned to CPU 0 and one pinned to CPU 1 bounce one atomic
// counter N times. Why decode at 2 threads is noisy on a VM: every token waits on a few such hand-offs between
// the threads, and their cost changes with where the host places the vCPUs (50-80 ns vs 340 ns on the 2-core VM in
// benchmarks/README.md). Build and run a few times in a row:
//   cc -O2 -pthread benchmarks/vcpu_pingpong.c -o /tmp/pingpong && for i in 1 2 3 4 5; do /tmp/pingpong; done
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static _Atomic long flag __attribute__((aligned(64)));
static long n_trips = 200000;

static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    pthread_setaffinity_np(pthread_self(), sizeof set, &set);
}

static void *pong(void *unused) {
    (void)unused;
    pin(1);
    for (long i = 0; i < n_trips; i++) {
        while (atomic_load_explicit(&flag, memory_order_acquire) != 2 * i + 1) {}
        atomic_store_explicit(&flag, 2 * i + 2, memory_order_release);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc > 1) n_trips = atol(argv[1]);
    pthread_t thread;
    pin(0);
    pthread_create(&thread, NULL, pong, NULL);
    struct timespec start, stop;
    clock_gettime(CLOCK_MONOTONIC, &start);
    for (long i = 0; i < n_trips; i++) {
        atomic_store_explicit(&flag, 2 * i + 1, memory_order_release);
        while (atomic_load_explicit(&flag, memory_order_acquire) != 2 * i + 2) {}
    }
    clock_gettime(CLOCK_MONOTONIC, &stop);
    pthread_join(thread, NULL);
    printf("%.1f ns per round trip\n", ((stop.tv_sec - start.tv_sec) * 1e9 + (stop.tv_nsec - start.tv_nsec)) / n_trips);
    return 0;
}
