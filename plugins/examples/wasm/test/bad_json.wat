;; Test-only policy plugin: grade returns bytes that are not JSON; admit returns a pointer past
;; the end of its memory.
(module
  (memory (export "memory") 1)
  (data (i32.const 16) "grade: twenty{")
  (func (export "cdt_policy_abi_v1"))
  (func (export "cdt_alloc") (param i32) (result i32) (i32.const 1024))
  ;; (16 << 32) | 14
  (func (export "cdt_grade") (param i32 i32) (result i64) (i64.const 68719476750))
  ;; (65530 << 32) | 100
  (func (export "cdt_admit") (param i32 i32) (result i64) (i64.const 281449206906980)))
