"""Reading a results pickle without running code: the restricted unpickler.

    from resnet_ode.safe_pickle import load_results
    results = load_results('MNIST_experiments/smoke.pkl')   # numpy arrays and plain values only

pickle.load runs whatever a crafted file asks for; load_results rebuilds only plain Python values
and numpy arrays of plain numeric and bool dtypes, and refuses everything else (UnsafePickle).
"""
from __future__ import annotations

import math
import pickle

from .files import open_regular

# What a results pickle may hold: plain Python values (dict, list, tuple, str, bytes, int, float,
# bool, None) and numpy arrays and scalars of plain numeric or bool dtypes. The release's 335
# stored pickles hold dicts of str, int, float and little-endian float32 arrays (tensor.numpy()).
#
# numpy rebuilds an array through three globals: numpy.dtype(type string, align, copy) followed
# by a BUILD with the dtype's state; _reconstruct(ndarray, shape, b'b') followed by a BUILD with
# (version, shape, dtype, fortran, raw bytes); scalar(dtype, raw bytes); and, in protocol 5,
# _frombuffer(bytes, dtype, shape, order). None of them is handed to the pickle: a crafted dtype
# state can declare an object field while saying the dtype holds no objects, and the array's
# raw bytes are then read as a pointer (a native crash, or worse). Each global is replaced by a
# stand-in that accepts only the plain forms and builds the dtype and the array itself.
PLAIN_DTYPES = frozenset(('b1', 'i1', 'u1', 'i2', 'u2', 'i4', 'u4', 'i8', 'u8',
                          'f2', 'f4', 'f8', 'c8', 'c16'))
_BYTE_ORDERS = frozenset('<>|=')
_NUMPY_MODULES = ('numpy.core.multiarray', 'numpy._core.multiarray')  # numpy 1 and 2 spellings


class UnsafePickle(pickle.UnpicklingError):
    """A pickle that asks for something a results file never holds (it could run code, or crash
    the process through a crafted numpy dtype)."""


class _PendingDtype:
    """numpy.dtype(type string, align, copy) as a pickle asks for it; becomes a real dtype only
    once its BUILD state has been checked (resolve)."""

    type_string = byte_order = None  # also what an instance made without __init__ (NEWOBJ) has

    def __init__(self, type_string=None, align=False, copy=True, *extra):
        if extra or not isinstance(type_string, str) or type_string not in PLAIN_DTYPES:
            raise UnsafePickle(f'it asks for a numpy dtype {type_string!r}; a results file holds '
                               f'only plain numeric and bool arrays')
        self.type_string, self.byte_order = type_string, None

    def __setstate__(self, state):
        # The state of a plain dtype: (version, byte order, subarray, names, fields, element
        # size, alignment, flags) = (3, '<', None, None, None, -1, -1, 0). Anything else (fields,
        # sizes, flags such as "holds no objects") is what a crafted dtype is made of.
        if (not isinstance(state, tuple) or len(state) != 8 or state[0] != 3
                or state[1] not in _BYTE_ORDERS or state[2:] != (None, None, None, -1, -1, 0)):
            raise UnsafePickle(f'it holds a numpy dtype {self.type_string} with the state '
                               f'{_short(state)}, which a plain dtype never has')
        self.byte_order = state[1]

    def resolve(self):
        if self.type_string not in PLAIN_DTYPES or self.byte_order is None:
            raise UnsafePickle(f'it holds a numpy dtype {self.type_string} without its state')
        order = '|' if self.type_string in ('b1', 'i1', 'u1') else self.byte_order
        if order == '|' and self.type_string not in ('b1', 'i1', 'u1'):
            raise UnsafePickle(f'it holds a numpy dtype {self.type_string} without a byte order')
        return _numpy().dtype(order + self.type_string)


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + '...'


def _dtype_of(value):
    if not isinstance(value, _PendingDtype):
        raise UnsafePickle(f'it gives {type(value).__name__} where a numpy dtype belongs')
    return value.resolve()


def _raw_bytes(value, expected: int) -> bytes:
    if not isinstance(value, (bytes, bytearray)):
        raise UnsafePickle(f'it gives {type(value).__name__} where an array\'s bytes belong')
    if len(value) != expected:
        raise UnsafePickle(f'it declares {expected} bytes of array data and holds {len(value)}')
    return bytes(value)


def _checked_shape(shape) -> tuple:
    if (not isinstance(shape, tuple) or len(shape) > 32
            or not all(type(n) is int and n >= 0 for n in shape)):
        raise UnsafePickle(f'it gives {_short(shape)} as an array shape')
    return shape


class _NdarrayClass:
    """Stands for numpy.ndarray in a pickle: accepted only as _reconstruct's first argument."""


class _PendingArray:
    """_reconstruct(ndarray, (0,), b'b') as a pickle asks for it; its BUILD state supplies the
    shape, dtype and bytes, and load_results swaps it for the array built from them."""

    def __init__(self, subtype=None, shape=None, placeholder=None, *extra):
        if subtype is not _NdarrayClass or extra:
            raise UnsafePickle('it rebuilds something other than a plain numpy array')

    array = None  # until its BUILD state arrives

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) != 5 or state[0] != 1:
            raise UnsafePickle(f'it holds an array state {_short(state)} that numpy never writes')
        _, shape, dtype, fortran, raw = state
        shape, dtype = _checked_shape(shape), _dtype_of(dtype)
        if type(fortran) is not bool:
            raise UnsafePickle(f'it gives {_short(fortran)} as an array\'s memory order')
        self.array = _array_from(raw, dtype, shape, 'F' if fortran else 'C')


def _array_from(raw, dtype, shape: tuple, order: str):
    np = _numpy()
    data = _raw_bytes(raw, math.prod(shape) * dtype.itemsize)
    return np.frombuffer(data, dtype=dtype).reshape(shape, order=order).copy(order=order)


def _scalar(dtype=None, raw=None, *extra):
    dtype = _dtype_of(dtype)
    if extra:
        raise UnsafePickle('it rebuilds a numpy scalar with extra arguments')
    return _array_from(raw, dtype, (), 'C')[()]


def _frombuffer(buffer=None, dtype=None, shape=None, order=None, *extra):
    dtype, shape = _dtype_of(dtype), _checked_shape(shape)
    if extra or order not in ('C', 'F'):
        raise UnsafePickle(f'it rebuilds an array in memory order {_short(order)}')
    return _array_from(buffer, dtype, shape, order)


RESULTS_GLOBALS = {('numpy', 'dtype'): _PendingDtype, ('numpy', 'ndarray'): _NdarrayClass}
for _module in _NUMPY_MODULES:
    RESULTS_GLOBALS[(_module, '_reconstruct')] = _PendingArray
    RESULTS_GLOBALS[(_module, 'scalar')] = _scalar
for _module in ('numpy.core.numeric', 'numpy._core.numeric'):
    RESULTS_GLOBALS[(_module, '_frombuffer')] = _frombuffer


def _numpy():
    import numpy  # imported on first use: this module stays importable without numpy
    return numpy


class _ResultsUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in RESULTS_GLOBALS:
            raise UnsafePickle(f'it asks for {module}.{name}, which a results file never holds')
        return RESULTS_GLOBALS[(module, name)]

    def persistent_load(self, pid):
        raise UnsafePickle('it refers to an object outside the file (a persistent id)')


_PLAIN_VALUES = (str, bytes, int, float, bool, type(None), complex)


def _finished(value):
    """`value` with every pending array replaced by its array, checked all the way down: only
    plain values, containers of them, and numpy arrays and scalars of plain dtypes remain.

    Iterative, so that a deeply nested or self-containing structure costs no recursion.
    """
    np = _numpy()
    done: dict[int, object] = {}

    def settled(item):
        if isinstance(item, _PendingArray):
            if item.array is None:
                raise UnsafePickle('it holds a numpy array that was never given its content')
            return item.array
        if isinstance(item, (_PendingDtype, _NdarrayClass)) or item is _NdarrayClass:
            raise UnsafePickle('it holds a bare numpy dtype or class, which a results file never does')
        return item

    root = settled(value)
    stack = [root]
    while stack:
        item = stack.pop()
        if id(item) in done:
            continue
        done[id(item)] = item
        kind = type(item)
        if kind in _PLAIN_VALUES:
            continue
        if kind is np.ndarray or isinstance(item, np.generic):
            if item.dtype.str.lstrip('<>|=') not in PLAIN_DTYPES or item.dtype.hasobject:
                raise UnsafePickle(f'it holds a numpy value of dtype {item.dtype}')
            continue
        if kind is dict:
            for key in item:
                if type(key) not in _PLAIN_VALUES:
                    raise UnsafePickle(f'it holds a dict key of type {type(key).__name__}')
            for key, child in item.items():
                item[key] = settled(child)
                stack.append(item[key])
        elif kind is list:
            item[:] = [settled(child) for child in item]
            stack.extend(item)
        elif kind in (tuple, set, frozenset):
            if any(isinstance(child, _PendingArray) for child in item):
                raise UnsafePickle(f'it holds a numpy array inside a {kind.__name__}, which a '
                                   f'results file never does')
            stack.extend(item)
        else:
            raise UnsafePickle(f'it holds a {kind.__name__}, which a results file never does')
    return root


def load_results(path: str):
    """A results pickle, read with an unpickler that can only rebuild plain values and numpy
    arrays of plain numeric and bool dtypes: a crafted file raises UnsafePickle, and neither
    runs code nor builds anything numpy could misread. Only a regular file is opened
    (NotARegularFile otherwise: a FIFO would block forever)."""
    with open_regular(path) as f:
        try:
            loaded = _ResultsUnpickler(f).load()
        except UnsafePickle:
            raise
        except RecursionError:
            raise UnsafePickle('it nests its values too deeply') from None
        except (TypeError, ValueError, AttributeError, IndexError, KeyError) as exc:
            # a stand-in called with arguments numpy would never write, or BUILD on a value
            raise UnsafePickle(f'it rebuilds its values in a way numpy never writes '
                               f'({type(exc).__name__}: {_short(str(exc))})') from None
    return _finished(loaded)

