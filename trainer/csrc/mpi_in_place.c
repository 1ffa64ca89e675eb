/* MPI_IN_PLACE is a macro whose value differs between MPI libraries ((void *) 1 in Open MPI,
 * (void *) -1 in MPICH); the `mpi` crate does not expose it. This function hands the value of the
 * mpi.h that bd3 is built against to Rust (trainer::dist::mpi). */
#include <mpi.h>

void *bd3_mpi_in_place(void) { return MPI_IN_PLACE; }
