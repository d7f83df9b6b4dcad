/* A UCX worker address with 4096 readable bytes behind it: what MPICH reads.
 *
 * MPICH 5.0's UCX netmod publishes its worker address through PMI by reading
 * MPID_MAX_BC_SIZE (4096) bytes from the buffer ucp_worker_get_address returned,
 * whatever the address's length (a "FIXME" in ch4/netmod/ucx/ucx_init.c,
 * MPIDI_UCX_comm_addr_exchange). The rest is whatever lies behind the buffer on the
 * heap: live Python objects, freed text. That is published to every rank (a leak of
 * this process's memory) and, under Slurm's pmi2 plugin, breaks MPI_Init: MPICH's
 * hex encoding compresses only runs of zero bytes, and a put line with junk in it
 * exceeds the 1024 bytes Slurm 22.05 reads per PMI-1 request.
 *
 * Loaded with RTLD_GLOBAL before MPI (hpcproc.mpi_init), this library's two functions
 * interpose on libucp's: the address is copied into a zeroed buffer of at least 4096
 * bytes, and released here. Every other caller (ucxx) gets the same bytes and
 * length as before. The real functions are found in the libucp.so.0 already loaded
 * (by the ucxx wheel's libucx or by MPICH itself); nothing else of UCX is needed, so
 * this builds without UCX headers: the two types below are all it uses.
 *
 * Not a Python extension module: ctypes loads it (it has no PyInit function).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <pthread.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

typedef int ucs_status_t; /* ucs/type/status.h: UCS_OK is 0, errors negative */
typedef struct ucp_worker *ucp_worker_h;
typedef struct ucp_address ucp_address_t;

#define UCS_OK 0
#define UCS_ERR_NO_ELEM (-12)

/* MPICH's MPID_MAX_BC_SIZE: the bytes it reads from the address. */
#define PADDED_SIZE 4096
/* Addresses handed out at once: one per worker (MPICH makes one per VCI). */
#define MAX_PADDED 256

typedef ucs_status_t (*get_address_fn)(ucp_worker_h, ucp_address_t **, size_t *);
typedef void (*release_address_fn)(ucp_worker_h, ucp_address_t *);

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static get_address_fn real_get_address;
static release_address_fn real_release_address;
static void *padded[MAX_PADDED];
static unsigned long padded_total;

/* The functions of the libucp.so.0 in this process; 0 when none is loaded. Called
 * with the lock held. */
static int resolve(void) {
    if (real_get_address != NULL && real_release_address != NULL) {
        return 1;
    }
    /* RTLD_NOLOAD: the library the caller is linked with, found by its soname. */
    void *ucp = dlopen("libucp.so.0", RTLD_NOW | RTLD_NOLOAD);
    if (ucp == NULL) {
        return 0;
    }
    real_get_address = (get_address_fn)dlsym(ucp, "ucp_worker_get_address");
    real_release_address = (release_address_fn)dlsym(ucp, "ucp_worker_release_address");
    dlclose(ucp); /* drops the reference NOLOAD took; libucp stays loaded */
    return real_get_address != NULL && real_release_address != NULL;
}

/* Remember a padded buffer; 0 when the table is full. Lock held. */
static int remember(void *buffer) {
    for (size_t i = 0; i < MAX_PADDED; i++) {
        if (padded[i] == NULL) {
            padded[i] = buffer;
            padded_total++;
            return 1;
        }
    }
    return 0;
}

/* Forget a padded buffer; 0 when it is not one. Lock held. */
static int forget(void *buffer) {
    for (size_t i = 0; i < MAX_PADDED; i++) {
        if (padded[i] == buffer && buffer != NULL) {
            padded[i] = NULL;
            return 1;
        }
    }
    return 0;
}

ucs_status_t ucp_worker_get_address(ucp_worker_h worker, ucp_address_t **address_p,
                                    size_t *address_length_p) {
    pthread_mutex_lock(&lock);
    int found = resolve();
    pthread_mutex_unlock(&lock);
    if (!found) {
        return UCS_ERR_NO_ELEM;
    }
    ucp_address_t *address;
    size_t length;
    ucs_status_t status = real_get_address(worker, &address, &length);
    if (status != UCS_OK) {
        return status;
    }
    void *copy = calloc(1, length > PADDED_SIZE ? length : PADDED_SIZE);
    if (copy != NULL) {
        pthread_mutex_lock(&lock);
        int kept = remember(copy);
        pthread_mutex_unlock(&lock);
        if (kept) {
            memcpy(copy, address, length);
            real_release_address(worker, address);
            address = copy;
        } else {
            free(copy); /* the table is full: hand out UCX's own buffer */
        }
    }
    *address_p = address;
    *address_length_p = length;
    return UCS_OK;
}

void ucp_worker_release_address(ucp_worker_h worker, ucp_address_t *address) {
    pthread_mutex_lock(&lock);
    int ours = forget(address);
    int found = ours || resolve();
    pthread_mutex_unlock(&lock);
    if (ours) {
        free(address);
    } else if (found) {
        real_release_address(worker, address);
    }
}

/* How many padded addresses this library has handed out (for tests). */
unsigned long hpcproc_padded_addresses(void) {
    pthread_mutex_lock(&lock);
    unsigned long total = padded_total;
    pthread_mutex_unlock(&lock);
    return total;
}
