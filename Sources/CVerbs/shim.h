#ifndef FINEMEM_CVERBS_SHIM_H
#define FINEMEM_CVERBS_SHIM_H

#include <infiniband/verbs.h>
#include <errno.h>

// `ibv_reg_mr` and `ibv_query_port` are function-like macros in rdma-core; Swift imports
// the old compat symbols instead. These wrappers call through the macros.

static inline struct ibv_mr *finemem_ibv_reg_mr(struct ibv_pd *pd, void *addr, size_t length,
                                                int access) {
    return ibv_reg_mr(pd, addr, length, access);
}

static inline int finemem_ibv_query_port(struct ibv_context *context, uint8_t port_num,
                                         struct ibv_port_attr *port_attr) {
    return ibv_query_port(context, port_num, port_attr);
}

static inline int finemem_errno(void) { return errno; }
static inline void finemem_clear_errno(void) { errno = 0; }

#endif
