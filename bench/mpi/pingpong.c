/* MPI ping-pong between ranks 0 and 1: the one-way time of a message of each size given on the
 * command line (round trip / 2), in microseconds, averaged over the iterations after a warm-up,
 * as `xproc` (charmrs) and `ucp_am_lat` (UCX) report theirs. The send buffer is written once
 * before the clock starts and reused, as theirs are.
 *
 *   mpirun -np 2 pingpong 8 4096 65536
 *
 * Prints one line per size: "size one_way_us". Written for bench/scripts/mpi-vs-charmrs.sh. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int iterations(long size) { return size <= 65536 ? 20000 : 2000; }

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, nranks;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &nranks);
    if (nranks != 2) {
        if (rank == 0) fprintf(stderr, "pingpong: needs exactly 2 ranks, got %d\n", nranks);
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    int peer = 1 - rank;
    for (int a = 1; a < argc; a++) {
        long size = strtol(argv[a], NULL, 10);
        if (size < 0) size = 0;
        char *buf = malloc(size > 0 ? (size_t)size : 1);
        memset(buf, 7, (size_t)size);
        int iters = iterations(size), warmup = iters / 10;
        double start = 0.0;
        for (int i = 0; i < warmup + iters; i++) {
            if (i == warmup) {
                MPI_Barrier(MPI_COMM_WORLD);
                start = MPI_Wtime();
            }
            if (rank == 0) {
                MPI_Send(buf, (int)size, MPI_BYTE, peer, 0, MPI_COMM_WORLD);
                MPI_Recv(buf, (int)size, MPI_BYTE, peer, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            } else {
                MPI_Recv(buf, (int)size, MPI_BYTE, peer, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
                MPI_Send(buf, (int)size, MPI_BYTE, peer, 0, MPI_COMM_WORLD);
            }
        }
        double one_way_us = (MPI_Wtime() - start) / iters / 2 * 1e6;
        if (rank == 0) printf("%ld %.3f\n", size, one_way_us);
        free(buf);
    }
    MPI_Finalize();
    return 0;
}
